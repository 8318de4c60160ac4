"""Max pooling (and DSMIL's max stream) follow the MIL assumption: a bag is positive if one of its tiles is.

With two classes the bag takes the logits of its most positive tile. The per-class
maximum it replaced let the most negative-looking tile speak for the negative class,
so a positive bag of 99 background tiles and one witness was called negative.
"""

from __future__ import annotations

import torch

from histofm.mil import build_aggregator


def _identity_max(in_dim: int = 2, num_classes: int = 2) -> torch.nn.Module:
    """Max pooling whose tile logits are the tile features themselves (``fc`` and classifier = identity)."""
    model = build_aggregator("max", in_dim=in_dim, num_classes=num_classes, hidden_dim=in_dim, dropout=0.0)
    with torch.no_grad():
        model.fc[0].weight.copy_(torch.eye(in_dim))
        model.fc[0].bias.fill_(10.0)  # keep every value positive through the ReLU
        model.classifier.weight.copy_(torch.eye(num_classes, in_dim))
        model.classifier.bias.fill_(-10.0)
    return model.eval()


def test_binary_bag_takes_the_logits_of_its_most_positive_tile() -> None:
    # 99 background tiles confidently negative (logits (3, 0)), one witness mildly positive (1, 2).
    tiles = torch.cat([torch.tensor([[3.0, 0.0]]).expand(99, 2), torch.tensor([[1.0, 2.0]])])
    order = torch.randperm(100, generator=torch.Generator().manual_seed(0))
    out = _identity_max()(tiles[order])
    # The witness's logits: a positive bag. The per-class maximum would have said (3, 2): negative.
    torch.testing.assert_close(out.logits, torch.tensor([[1.0, 2.0]]))
    assert out.scores is not None and int(out.scores.argmax()) == int((order == 99).nonzero())  # the witness ranks first


def test_masked_tiles_never_win_and_more_classes_keep_the_per_class_maximum() -> None:
    model = _identity_max()
    x = torch.tensor([[[3.0, 0.0], [0.0, 5.0]], [[2.0, 1.0], [0.0, 9.0]]])  # (B=2, N=2, 2)
    mask = torch.tensor([[True, True], [True, False]])
    torch.testing.assert_close(model(x, mask).logits, torch.tensor([[0.0, 5.0], [2.0, 1.0]]))
    three = _identity_max(3, 3)
    y = torch.tensor([[4.0, 0.0, 1.0], [0.0, 2.0, 3.0]])
    torch.testing.assert_close(three(y).logits, torch.tensor([[4.0, 2.0, 3.0]]))


def test_binary_dsmil_max_stream_follows_the_most_positive_tile() -> None:
    """DSMIL's max stream has the same rule: one critical tile, the most positive (the paper's binary form)."""
    model = build_aggregator("dsmil", in_dim=2, num_classes=2, hidden_dim=2, query_dim=2, dropout=0.0)
    with torch.no_grad():
        model.fc[0].weight.copy_(torch.eye(2))
        model.fc[0].bias.fill_(10.0)
        model.instance_classifier.weight.copy_(torch.eye(2))
        model.instance_classifier.bias.fill_(-10.0)
        model.bag_classifier.weight.zero_()  # silence the bag stream: logits = max stream / 2
        model.bag_classifier.bias.zero_()
    tiles = torch.cat([torch.tensor([[3.0, 0.0]]).expand(99, 2), torch.tensor([[1.0, 2.0]])])
    out = model.eval()(tiles[torch.randperm(100, generator=torch.Generator().manual_seed(0))])
    torch.testing.assert_close(out.logits, torch.tensor([[0.5, 1.0]]))  # per-class max: (1.5, 1.0), negative
