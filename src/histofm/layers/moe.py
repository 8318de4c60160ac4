"""Mixture-of-experts MLP: top-k softmax routing, expert capacity, auxiliary losses.

A sparsely gated mixture of experts (Shazeer et al. 2017, arXiv 1701.06538)
replaces one feed-forward block by ``E`` expert MLPs and a linear router. Each
token goes to its ``k`` highest-scoring experts and the outputs are mixed by
the router's probabilities::

    p(x) = softmax(W_r x)                                   # (E,) router probabilities
    y(x) = sum_{i in TopK(p(x))} g_i(x) * Expert_i(x)      # g_i = p_i, or p_i / sum_TopK p_j

GShard (Lepikhin et al. 2020, arXiv 2006.16668) renormalises the top-k gates
to sum to one; Switch (Fedus et al. 2021, arXiv 2101.03961) uses ``k = 1`` and
the raw probability. Each expert accepts at most ``C = ceil(cf * T * k / E)``
of the ``T`` tokens in the call (``cf``: capacity factor); assignments beyond
that are dropped (first choices of all tokens before second choices) and the
token passes through the block's residual connection unchanged.

Two auxiliary losses keep routing healthy:

* load balancing (Switch eq. 4, GShard's ``l_aux``): ``L_bal = E * sum_i f_i P_i``
  with ``f_i`` the fraction of the ``T * k`` routing assignments that chose
  expert ``i`` (before capacity) and ``P_i`` the mean router probability of
  expert ``i``. Its minimum, 1, is reached by uniform routing; it is ``E`` when
  every token goes to one expert with certainty. Gradients flow through ``P``.
* router z-loss (ST-MoE, Zoph et al. 2022, arXiv 2202.08906):
  ``L_z = mean_t (logsumexp_j z_tj)^2`` keeps router logits small (stability in low precision).

Every forward with autograd enabled ADDS its (unweighted) losses to ``self.aux_losses``; a model can
call its MoE layers several times per step (multi-crop SSL), and
:func:`collect_aux_losses` returns the weighted per-call means summed over layers,
then clears them. Methods add them to their loss with :func:`add_aux_losses`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from histofm.errors import HistofmError
from histofm.layers.mlp import Mlp, SwiGLUPacked


def load_balancing_loss(probs: torch.Tensor, expert_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch/GShard balancing loss ``E * sum_i f_i P_i``.

    Args:
        probs: router probabilities ``(T, E)``.
        expert_index: chosen experts ``(T, k)`` (before capacity dropping).
        num_experts: ``E``.

    Returns:
        A scalar; 1 for perfectly uniform routing, ``E`` for total collapse onto one expert.
    """
    counts = torch.bincount(expert_index.reshape(-1), minlength=num_experts).to(probs.dtype)  # (E,)
    f = counts / expert_index.numel()  # fraction of assignments per expert: no gradient (argmax)
    P = probs.mean(dim=0)  # (E,) mean router probability: carries the gradient
    return num_experts * (f * P).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss ``mean_t (logsumexp_j z_tj)^2`` on logits ``(T, E)``."""
    return torch.logsumexp(logits, dim=-1).square().mean()


class MoEMlp(nn.Module):
    """Drop-in replacement of a ViT MLP block by ``num_experts`` experts with top-k routing.

    Args:
        in_features: token width ``D``.
        hidden_features: hidden width of each expert (as the dense MLP it replaces).
        num_experts: ``E``.
        top_k: experts per token ``k``.
        capacity_factor: ``cf`` in ``C = ceil(cf * T * k / E)``; ``None`` or ``<= 0`` keeps every assignment.
        expert_layer: ``"mlp"`` (GELU) or ``"swiglu"`` experts, with the dense blocks' parameter names.
        drop: dropout inside the experts.
        normalize_gates: renormalise the top-k gates to sum to one (GShard); ``False`` uses the
            raw probabilities (Switch, ``k = 1``).
        balance_loss_weight: weight of ``L_bal`` in :func:`collect_aux_losses` (0.01 in Switch/GShard).
        z_loss_weight: weight of ``L_z`` (1e-3 in ST-MoE).

    Attributes:
        aux_losses: ``{"balance": sum of L_bal, "z": sum of L_z}`` over the calls with autograd enabled
            since the last collection (``no_grad`` / inference calls, e.g. an EMA teacher, add nothing).
        aux_calls: number of forward calls accumulated in ``aux_losses``.
        last_load: ``(E,)`` fraction of the last call's assignments per expert (before capacity).
        last_dropped: fraction of the last call's assignments dropped by the capacity limit.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        num_experts: int = 8,
        top_k: int = 2,
        capacity_factor: float | None = 1.25,
        expert_layer: str = "mlp",
        drop: float = 0.0,
        normalize_gates: bool = True,
        balance_loss_weight: float = 0.01,
        z_loss_weight: float = 1e-3,
    ) -> None:
        super().__init__()
        if num_experts < 1:
            raise HistofmError(f"num_experts must be at least 1, got {num_experts}; set num_experts to 1 or more.")
        if not 1 <= top_k <= num_experts:
            raise HistofmError(f"top_k must be between 1 and num_experts={num_experts}, got {top_k}; lower top_k or add experts.")
        if expert_layer == "mlp":
            make: Callable[[], nn.Module] = lambda: Mlp(in_features, hidden_features, drop=drop)  # noqa: E731
        elif expert_layer == "swiglu":
            make = lambda: SwiGLUPacked(in_features, hidden_features, drop=drop)  # noqa: E731
        else:
            raise HistofmError(f"expert_layer must be 'mlp' or 'swiglu', got {expert_layer!r}; set one of those.")
        self.num_experts = num_experts
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.normalize_gates = normalize_gates
        self.balance_loss_weight = balance_loss_weight
        self.z_loss_weight = z_loss_weight
        self.router = nn.Linear(in_features, num_experts, bias=False)
        self.experts = nn.ModuleList(make() for _ in range(num_experts))
        self.aux_losses: dict[str, torch.Tensor] = {}
        self.aux_calls = 0
        self.last_load = torch.zeros(num_experts)
        self.last_dropped = torch.zeros(())

    def capacity(self, num_tokens: int) -> int:
        """Most assignments one expert accepts in a call with ``num_tokens`` tokens."""
        if self.capacity_factor is None or self.capacity_factor <= 0:
            return num_tokens
        return max(1, math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router for tokens ``(T, D)``: logits ``(T, E)``, probs ``(T, E)``, gates ``(T, k)``, experts ``(T, k)``.

        The router runs in float32 even under autocast: small logit differences decide the routing.
        """
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.float(), self.router.weight.float())  # (T, E)
        probs = logits.softmax(dim=-1)
        gates, index = probs.topk(self.top_k, dim=-1)  # (T, k), sorted: first choice first
        if self.normalize_gates and self.top_k > 1:
            gates = gates / gates.sum(dim=-1, keepdim=True)
        return logits, probs, gates, index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens ``(..., D)`` -> ``(..., D)``; dropped assignments contribute zero."""
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])  # (T, D)
        T = tokens.shape[0]
        logits, probs, gates, index = self.route(tokens)

        # Capacity: walk the assignments choice by choice (all first choices, then all
        # second choices, ...) and keep an expert's first C of them.
        flat_index = index.t().reshape(-1)  # (k*T,) choice-major order
        onehot = F.one_hot(flat_index, self.num_experts)  # (k*T, E)
        position = (onehot.cumsum(dim=0) * onehot).sum(dim=-1) - 1  # rank within its expert
        keep = position < self.capacity(T)  # (k*T,)
        token_id = torch.arange(T, device=x.device).repeat(self.top_k)  # (k*T,)
        flat_gate = gates.t().reshape(-1)  # (k*T,)

        # Group the kept assignments by expert (one host sync for the group sizes).
        kept_expert = flat_index[keep]
        order = torch.argsort(kept_expert, stable=True)
        tid_sorted = token_id[keep][order]
        gate_sorted = flat_gate[keep][order]
        sizes = torch.bincount(kept_expert, minlength=self.num_experts).tolist()

        out = torch.zeros_like(tokens)
        start = 0
        for expert, n in zip(self.experts, sizes):
            if n:
                tid = tid_sorted[start : start + n]
                y = expert(tokens[tid]) * gate_sorted[start : start + n, None].to(tokens.dtype)  # (n_e, D)
                out.index_add_(0, tid, y.to(out.dtype))
            start += n

        with torch.no_grad():
            self.last_load = onehot.sum(dim=0).float() / onehot.shape[0]
            self.last_dropped = (~keep).float().mean()
        self._accumulate(
            {"balance": load_balancing_loss(probs, index, self.num_experts), "z": router_z_loss(logits)}
        )
        return out.reshape(shape)

    def _accumulate(self, losses: dict[str, torch.Tensor]) -> None:
        if not torch.is_grad_enabled():
            return  # inference, EMA teachers: nothing to train, nothing to accumulate
        if torch._C._current_graph_task_id() != -1:
            return  # a forward re-run inside backward (activation checkpointing): already counted
        for k, v in losses.items():
            self.aux_losses[k] = self.aux_losses[k] + v if k in self.aux_losses else v
        self.aux_calls += 1

    def pop_aux_losses(self) -> dict[str, torch.Tensor]:
        """Per-call means of the accumulated (unweighted) losses; clears the accumulator."""
        calls = max(self.aux_calls, 1)
        out = {k: v / calls for k, v in self.aux_losses.items()}
        self.aux_losses, self.aux_calls = {}, 0
        return out

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, top_k={self.top_k}, capacity_factor={self.capacity_factor}"


def collect_aux_losses(model: nn.Module, reset: bool = True) -> dict[str, torch.Tensor]:
    """Weighted auxiliary losses of every :class:`MoEMlp` in ``model``, summed over layers.

    Returns ``{"aux_moe_balance": sum_l w_bal * L_bal^l, "aux_moe_z": sum_l w_z * L_z^l}``
    (per-call means since the last collection), or ``{}`` when no MoE layer ran.
    With ``reset=False`` the accumulators are left in place.
    """
    total: dict[str, torch.Tensor] = {}
    for m in model.modules():
        if not isinstance(m, MoEMlp) or not m.aux_calls:
            continue
        if reset:
            losses = m.pop_aux_losses()
        else:
            losses = {k: v / m.aux_calls for k, v in m.aux_losses.items()}
        for name, weight in (("balance", m.balance_loss_weight), ("z", m.z_loss_weight)):
            key = f"aux_moe_{name}"
            term = weight * losses[name]
            total[key] = total[key] + term if key in total else term
    return total


def add_aux_losses(out: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Add ``model``'s MoE auxiliary losses into ``out["loss"]`` and log them as ``aux_moe_*``.

    Call it at the end of a method's ``forward`` (the engine's convention: ``aux_*`` terms are
    already part of ``"loss"``). A model without MoE layers leaves ``out`` unchanged.
    """
    aux = collect_aux_losses(model)
    if not aux:
        return out
    out = dict(out)
    out["loss"] = out["loss"] + sum(v.to(out["loss"].dtype) for v in aux.values())
    out.update(aux)
    return out


def moe_mlp_factory(
    every: int,
    num_experts: int = 8,
    top_k: int = 2,
    capacity_factor: float | None = 1.25,
    mlp_layer: str = "mlp",
    drop: float = 0.0,
) -> Callable[[int, int, int], nn.Module]:
    """An ``mlp_factory(dim, hidden, block_index)`` for :class:`~histofm.models.vit.VisionTransformer`.

    Block ``i`` gets an :class:`MoEMlp` when ``(i + 1) % every == 0`` (with ``every=2``: blocks
    1, 3, 5, ..., the "every other layer" of GShard and Switch) and the dense MLP otherwise, so the
    dense blocks keep their usual parameter names.
    """
    if every < 1:
        raise HistofmError(f"moe_every must be a positive integer, got {every}; set e.g. moe_every=2 (every second block).")

    def factory(dim: int, hidden: int, index: int) -> nn.Module:
        if (index + 1) % every == 0:
            return MoEMlp(dim, hidden, num_experts, top_k, capacity_factor, expert_layer=mlp_layer, drop=drop)
        if mlp_layer == "swiglu":
            return SwiGLUPacked(dim, hidden, drop=drop)
        return Mlp(dim, hidden, drop=drop)

    return factory
