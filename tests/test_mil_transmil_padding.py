"""TransMIL on padded batches: a bag's output must not depend on the other bags of its batch.

PPEG lays the tokens of a bag on a square grid and convolves; if the zero padding of a
batch (bags padded to the longest) or the square fill entered that grid, a bag's class
token would change with the batch it is in. Batched training (batches of 16 bags in the
real-pixel MIL task) would then optimise a different model from the one that predicts
bag by bag.
"""

from __future__ import annotations

import pytest
import torch

from histofm.errors import HistofmError
from histofm.mil import build_aggregator
from histofm.mil.train import pad_bags


def _model(dropout: float = 0.0):
    torch.manual_seed(0)
    return build_aggregator("transmil", in_dim=6, num_classes=2, dim=16, num_heads=2, num_landmarks=8, dropout=dropout)


def test_a_bag_alone_equals_the_same_bag_padded_in_a_batch() -> None:
    model = _model().eval()
    g = torch.Generator().manual_seed(1)
    short, long = torch.randn(10, 6, generator=g), torch.randn(37, 6, generator=g)  # 10: a 4 x 4 grid with fill
    x, mask = pad_bags([short, long])  # (2, 37, 6): 27 zero rows after the short bag
    assert not bool(mask[0].all())
    with torch.no_grad():
        alone = model(short.unsqueeze(0))
        batch = model(x, mask)
        other = model(long.unsqueeze(0))
    torch.testing.assert_close(batch.logits[0], alone.logits[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(batch.logits[1], other.logits[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(batch.scores[0, :10], alone.scores[0], rtol=1e-5, atol=1e-6)
    assert float(batch.scores[0, 10:].abs().sum()) == 0.0  # padding gets no score
    # Padding filled with large values instead of zeros changes nothing either.
    x_big = torch.where(mask.unsqueeze(-1), x, torch.full_like(x, 1e3))
    with torch.no_grad():
        torch.testing.assert_close(model(x_big, mask).logits, batch.logits)


def test_training_gradients_do_not_see_the_padding() -> None:
    model = _model().train()  # no dropout: the two passes must be identical
    g = torch.Generator().manual_seed(2)
    short, long = torch.randn(10, 6, generator=g), torch.randn(37, 6, generator=g)
    x, mask = pad_bags([short, long])
    model(x, mask).logits[0, 1].backward()
    batched = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(short.unsqueeze(0)).logits[0, 1].backward()
    for a, b in zip(batched, (p.grad for p in model.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_tile_order_enters_only_through_the_residual_conv_ppeg_and_landmarks() -> None:
    """TransMIL is not permutation invariant by design; these are the only places the order enters."""
    torch.manual_seed(0)
    model = build_aggregator("transmil", in_dim=6, num_classes=2, dim=16, num_heads=2, num_landmarks=64).eval()
    bag = torch.randn(49, 6)  # a 7 x 7 square: no fill; 64 >= 50 tokens: every token is a landmark
    perm = torch.randperm(49)
    with torch.no_grad():
        before = model(bag).logits
        assert not torch.allclose(model(bag[perm]).logits, before, atol=1e-4)  # as built: the order matters
        for layer in (model.layer1, model.layer2):
            layer.attn.res_conv = None
        for conv in (model.pos.proj, model.pos.proj1, model.pos.proj2):
            conv.weight.zero_()
            conv.bias.zero_()
        torch.testing.assert_close(model(bag[perm]).logits, model(bag).logits, rtol=1e-4, atol=1e-5)
    assert build_aggregator("transmil", in_dim=6, num_classes=2, dim=16, num_heads=2,
                            residual_kernel=0).layer1.attn.res_conv is None
    no_pos = build_aggregator("transmil", in_dim=6, num_classes=2, dim=16, num_heads=2, num_landmarks=64,
                              residual_kernel=0, ppeg=False).eval()
    with torch.no_grad():  # neither residual nor PPEG, every token a landmark: invariant to the tile order
        torch.testing.assert_close(no_pos(bag[perm]).logits, no_pos(bag).logits, rtol=1e-4, atol=1e-5)


def test_bad_residual_kernel() -> None:
    with pytest.raises(HistofmError, match="residual_kernel"):
        build_aggregator("transmil", in_dim=6, num_classes=2, dim=16, num_heads=2, residual_kernel=4)


def test_one_layer_reads_the_tiles_directly() -> None:
    torch.manual_seed(0)
    model = build_aggregator("transmil", in_dim=6, num_classes=2, dim=16, num_heads=2, num_landmarks=64,
                             residual_kernel=0, num_layers=1).double().eval()
    assert model.layer2 is None and model.pos is None
    model.layer1.attn.pinv_iterations = 40  # every token a landmark: exact once the pseudo-inverse converges
    bag = torch.randn(10, 6, dtype=torch.float64)  # not a square: one layer has no grid and repeats no tile
    with torch.no_grad():
        out = model(bag)
        h = torch.cat([model.cls_token[0], model.fc(bag)])  # (11, 16)
        attn = model.layer1.attn
        q, k, v = attn.qkv(model.layer1.norm(h)).unflatten(-1, (3, 2, 8)).permute(1, 2, 0, 3)  # (3, 2, 11, 8)
        w = torch.softmax(q[:, :1] @ k.transpose(-1, -2) / 8**0.5, dim=-1)  # (2, 1, 11) exact attention
        cls = h[0] + attn.proj((w @ v).transpose(0, 1).flatten(1))[0]
        torch.testing.assert_close(out.logits[0], model.head(model.norm(cls)), rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(out.scores[0], w.mean(0)[0, 1:], rtol=1e-6, atol=1e-8)
    with pytest.raises(HistofmError, match="score_layer"):
        build_aggregator("transmil", in_dim=6, num_classes=2, dim=16, num_heads=2, num_layers=1, score_layer=2)
