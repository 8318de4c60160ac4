"""Mean and max pooling: the simplest MIL baselines.

Each tile embedding ``x_n`` goes through a small shared MLP ``h_n = phi(x_n)`` and a
linear classifier ``l_n = W h_n + b`` (per-tile logits). The bag logits are then

* mean pooling: ``logits = W (1/N sum_n h_n) + b = 1/N sum_n l_n`` (embedding-level
  mean, which equals the mean of tile logits because the classifier is linear);
* max pooling, two classes: the bag takes the logits of its most positive tile,
  ``logits = l_{n*}`` with ``n* = argmax_n (l_{n,1} - l_{n,0})``, so the bag's log-odds
  are ``max_n (l_{n,1} - l_{n,0})``: the classic MIL assumption "a bag is positive if
  one instance is" (Dietterich et al. 1997; CLAM's ``MIL_fc`` baseline selects the
  top instance the same way);
* max pooling, ``C > 2`` classes: ``logits_c = max_n l_{n,c}`` (each class present if
  one tile shows it).

Why not the per-class maximum for two classes as well: then the negative class's logit
is ``max_n l_{n,0}``, the most *negative-looking* tile, and a positive bag is 99 %
negative-looking tiles. Class 1 must out-shout the best background tile, and the same
background tiles get pushed down in positive bags and up in negative ones. On the
real-pixel task of :mod:`histofm.eval.mil_task` that version did not learn at a 1 %
witness rate (validation AUROC 0.51-0.58; this rule: 0.78-0.87).

The per-tile score is the tile's evidence for the predicted class,
``l_{n,pred} - mean_c l_{n,c}`` (for two classes half the tile's log-odds).
"""

from __future__ import annotations

import torch
from torch import nn

from histofm.mil.base import MILAggregator, MILOutput, dropout_layer, register_aggregator


def tile_evidence(instance_logits: torch.Tensor, bag_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-tile evidence ``(B, N)`` for the bag's predicted class; padded tiles get ``-inf``."""
    pred = bag_logits.argmax(dim=-1)  # (B,)
    chosen = instance_logits.gather(-1, pred.view(-1, 1, 1).expand(-1, instance_logits.shape[1], 1)).squeeze(-1)
    scores = chosen - instance_logits.mean(dim=-1)  # (B, N)
    return scores.masked_fill(~mask, float("-inf"))


class _Pooling(MILAggregator):
    def __init__(self, in_dim: int, num_classes: int, hidden_dim: int = 256, dropout: float = 0.25) -> None:
        super().__init__(in_dim, num_classes)
        self.fc = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), dropout_layer(dropout))
        self.classifier = nn.Linear(hidden_dim, num_classes)

    def _pool(self, inst: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(
        self, features: torch.Tensor, mask: torch.Tensor | None = None, *, labels: torch.Tensor | None = None
    ) -> MILOutput:
        x, mask = self.check_inputs(features, mask)
        inst = self.classifier(self.fc(x))  # (B, N, C) per-tile logits
        logits = self._pool(inst, mask)  # (B, C)
        return MILOutput(logits=logits, scores=tile_evidence(inst, logits, mask))


@register_aggregator("mean")
class MeanPooling(_Pooling):
    """Mean of tile embeddings after a shared MLP, then a linear classifier."""

    def _pool(self, inst: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.unsqueeze(-1).to(inst.dtype)
        return (inst * m).sum(1) / m.sum(1)


@register_aggregator("max")
class MaxPooling(_Pooling):
    """Instance-level max pooling: the most positive tile's logits (two classes), else the per-class maximum."""

    def _pool(self, inst: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if inst.shape[-1] != 2:
            return inst.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(dim=1)  # (B, C)
        margin = (inst[..., 1] - inst[..., 0]).masked_fill(~mask, float("-inf"))  # (B, N) tile log-odds
        top = margin.argmax(dim=1)  # (B,) the most positive tile
        return inst.gather(1, top.view(-1, 1, 1).expand(-1, 1, 2)).squeeze(1)  # (B, 2)
