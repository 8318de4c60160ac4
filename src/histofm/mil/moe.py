"""Mixture-of-experts MIL: one expert aggregator per feature set, mixed by a slide-level router.

Different foundation models see different things in the same tiles. Here a
slide's tile features are the concatenation of several encoders' embeddings
(for example UNI 1024 + H-optimus 1536 + Virchow2 2560 dimensions), and each
*expert* is a full MIL aggregator (ABMIL by default) reading ONE of those
feature sets. A router looks at the slide as a whole (the masked mean of every
feature set, layer-normalised) and decides how much to trust each expert:

    g = softmax(W_r LN([mean_n x_n^(1); ...; mean_n x_n^(E)]))            # (E,) gates per slide
    p(y | slide) = sum_{i in TopK(g)} g~_i softmax(f_i(x^(i)))              # mixture of expert predictions
    logits = log p(y | slide)                                                 # valid logits: softmax(logits) = p

This is the original mixture of experts (Jacobs, Jordan, Nowlan & Hinton 1991,
"Adaptive Mixtures of Local Experts"): the experts' predictive distributions
are mixed, so the cross-entropy on ``logits`` is the negative log-likelihood of
the mixture. With ``top_k < E`` only the ``k`` best experts per slide are mixed
(gates renormalised, as in GShard) and the Switch load-balancing loss plus the
ST-MoE router z-loss (:mod:`histofm.layers.moe`) are returned in ``aux_loss``;
with dense gating (the default) only the z-loss is, because balancing is then
constant. Without ``feature_dims`` every expert reads the whole feature vector
(a plain mixture of ``num_experts`` aggregators).

Per-tile ``scores`` are the gate-weighted mix of the experts' scores (for
attention experts, weights that still sum to one over the real tiles).
Experts are evaluated densely: slides are few and bags small next to a ViT.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from histofm.errors import HistofmError
from histofm.layers.moe import load_balancing_loss, router_z_loss
from histofm.mil.base import MILAggregator, MILOutput, build_aggregator, masked_mean, register_aggregator


@register_aggregator("moe")
class MoEMIL(MILAggregator):
    """Mixture of MIL experts over one or several foundation models' feature sets.

    Args:
        in_dim: size of the tile feature vector (the sum of ``feature_dims`` when given).
        num_classes: number of slide classes.
        feature_dims: sizes of the concatenated feature sets, in order; expert ``i`` reads set ``i``.
            ``None``: ``num_experts`` experts all read the full vector.
        num_experts: number of experts when ``feature_dims`` is ``None``.
        top_k: experts mixed per slide (at least 2, so the router learns from the slide loss);
            ``None`` mixes all of them (dense gating).
        expert: name of the expert aggregator (any registered one, ``"abmil"`` by default).
        expert_kwargs: options of every expert (``{"hidden_dim": 128}`` ...).
        balance_loss_weight: weight of the load-balancing loss (sparse gating only).
        z_loss_weight: weight of the router z-loss.
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        feature_dims: Sequence[int] | None = None,
        num_experts: int = 4,
        top_k: int | None = None,
        expert: str = "abmil",
        expert_kwargs: dict[str, Any] | None = None,
        balance_loss_weight: float = 0.01,
        z_loss_weight: float = 1e-3,
    ) -> None:
        super().__init__(in_dim, num_classes)
        if feature_dims is not None:
            dims = [int(d) for d in feature_dims]
            if not dims or min(dims) <= 0 or sum(dims) != in_dim:
                raise HistofmError(
                    f"feature_dims {dims} must be positive sizes that add up to in_dim={in_dim}; "
                    "list the embedding size of each encoder whose features were concatenated."
                )
            self.feature_dims: list[int] | None = dims
            n = len(dims)
        else:
            if num_experts < 1:
                raise HistofmError(f"num_experts must be at least 1, got {num_experts}.")
            self.feature_dims = None
            n = num_experts
        if top_k is not None and not 2 <= top_k <= n:
            # With one expert per slide its renormalised gate is 1 and the router would learn
            # nothing from the slide loss (only from the auxiliary losses).
            raise HistofmError(
                f"top_k must be between 2 and the number of experts ({n}), or None for dense gating; got {top_k}."
            )
        if expert == "moe":
            raise HistofmError("A MoE aggregator cannot use 'moe' experts; choose e.g. abmil.")
        self.num_experts = n
        self.top_k = top_k
        self.balance_loss_weight = balance_loss_weight
        self.z_loss_weight = z_loss_weight
        expert_dims = self.feature_dims or [in_dim] * n
        kwargs = dict(expert_kwargs or {})
        self.experts = nn.ModuleList(build_aggregator(expert, d, num_classes, **kwargs) for d in expert_dims)
        self.router_norm = nn.LayerNorm(in_dim)
        self.router = nn.Linear(in_dim, n)
        nn.init.zeros_(self.router.weight)  # start from uniform trust in every expert
        nn.init.zeros_(self.router.bias)

    def _split(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.feature_dims is None:
            return [x] * self.num_experts
        return list(x.split(self.feature_dims, dim=-1))

    def gates(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router logits ``(B, E)`` and log-gates ``(B, E)`` (``-inf`` outside the top-k) of padded bags."""
        summary = masked_mean(x.float(), mask)  # (B, D): every feature set's slide mean
        logits = self.router(self.router_norm(summary))  # (B, E)
        log_probs = logits.log_softmax(dim=-1)
        if self.top_k is None or self.top_k == self.num_experts:
            return logits, log_probs
        top, idx = log_probs.topk(self.top_k, dim=-1)  # (B, k)
        top = top - top.logsumexp(dim=-1, keepdim=True)  # renormalise over the chosen experts
        return logits, torch.full_like(log_probs, float("-inf")).scatter(-1, idx, top)

    def forward(
        self, features: torch.Tensor, mask: torch.Tensor | None = None, *, labels: torch.Tensor | None = None
    ) -> MILOutput:
        x, mask = self.check_inputs(features, mask)
        router_logits, log_g = self.gates(x, mask)  # (B, E)
        g = log_g.exp()
        outs = [e(part, mask, labels=labels) for e, part in zip(self.experts, self._split(x))]
        log_p = torch.stack([F.log_softmax(o.logits.float(), dim=-1) for o in outs], dim=1)  # (B, E, C)
        # log sum_i g_i p_i; experts outside the top-k have log g_i = -inf and drop out.
        logits = torch.logsumexp(log_p + log_g.unsqueeze(-1), dim=1)  # (B, C)

        scores = None
        if all(o.scores is not None for o in outs):
            s = torch.stack([o.scores.float() for o in outs], dim=1)  # (B, E, N)
            s = torch.where(torch.isneginf(s), torch.zeros_like(s), s)  # logit-type experts: pads -> 0
            scores = (g.unsqueeze(-1) * s).sum(dim=1).masked_fill(~mask, 0.0)

        aux = self.z_loss_weight * router_z_loss(router_logits)
        if self.top_k is not None and self.top_k < self.num_experts:
            chosen = router_logits.topk(self.top_k, dim=-1).indices  # (B, k)
            probs = router_logits.softmax(dim=-1)
            aux = aux + self.balance_loss_weight * load_balancing_loss(probs, chosen, self.num_experts)
        expert_aux = [o.aux_loss for o in outs if o.aux_loss is not None]
        if expert_aux:
            aux = aux + torch.stack(expert_aux).mean()
        return MILOutput(logits=logits.to(features.dtype), scores=scores, aux_loss=aux)
