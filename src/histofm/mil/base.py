"""The common interface of every multiple-instance-learning (MIL) aggregator.

A whole slide is a *bag* of tile embeddings with a single label. An aggregator
maps the bag to slide logits and, where it has them, one importance score per
tile (attention weights, instance logits) for heatmaps::

    out = agg(features, mask)        # features (B, N, D), mask (B, N) bool or None
    out.logits    # (B, C)
    out.scores    # (B, N) per-tile importance, or None; padded tiles get -inf / 0
    out.aux_loss  # scalar extra loss to add in training (CLAM's instance loss), or None

Bags of different sizes are handled either one bag at a time (``B = 1``, no
mask) or padded into one batch with ``mask[b, n] = True`` for real tiles and
``False`` for padding. Every aggregator must give the same logits for a bag
whether it is alone or padded beside a longer one (tested for each).

Aggregators are registered by name::

    @register_aggregator("abmil")
    class ABMIL(MILAggregator): ...

    agg = build_aggregator("abmil", in_dim=1024, num_classes=2, hidden_dim=256)

Some aggregators use the slide label during training (CLAM's instance
clustering); they accept it as the keyword ``labels`` (``(B,)`` long) and ignore
it otherwise. The constructor of every aggregator takes ``in_dim`` and
``num_classes`` first, then keyword options.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from histofm.errors import HistofmError


@dataclass
class MILOutput:
    """What an aggregator returns.

    Attributes:
        logits: slide logits ``(B, C)``.
        scores: per-tile importance ``(B, N)`` (higher = more important), or ``None``
            for aggregators without a per-tile notion. Padded positions are set to
            ``-inf`` for scores that are logits and ``0`` for weights that sum to one.
        aux_loss: a scalar to add to the slide loss in training, or ``None``.
    """

    logits: torch.Tensor
    scores: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


class MILAggregator(nn.Module):
    """Base class: subclasses implement :meth:`forward` and keep ``in_dim`` / ``num_classes``."""

    in_dim: int
    num_classes: int

    def __init__(self, in_dim: int, num_classes: int) -> None:
        super().__init__()
        if in_dim <= 0 or num_classes <= 0:
            raise HistofmError(f"MIL aggregator needs in_dim > 0 and num_classes > 0, got {in_dim} and {num_classes}.")
        self.in_dim = in_dim
        self.num_classes = num_classes

    def forward(
        self, features: torch.Tensor, mask: torch.Tensor | None = None, *, labels: torch.Tensor | None = None
    ) -> MILOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def check_inputs(
        self, features: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Validate ``features`` and return it as ``(B, N, D)`` with a bool mask ``(B, N)``.

        A single bag ``(N, D)`` is promoted to ``(1, N, D)``. With no mask, every tile is real.
        """
        if features.dim() == 2:
            features = features.unsqueeze(0)
            mask = mask.unsqueeze(0) if mask is not None and mask.dim() == 1 else mask
        if features.dim() != 3:
            raise HistofmError(
                f"MIL features must have shape (B, N, D) or (N, D), got {tuple(features.shape)}; "
                "stack the tile embeddings of each slide."
            )
        B, N, D = features.shape
        if D != self.in_dim:
            raise HistofmError(
                f"MIL features have dimension {D} but the aggregator was built for in_dim={self.in_dim}; "
                "rebuild it with the encoder's embedding size."
            )
        if N == 0:
            raise HistofmError("A MIL bag has no tiles; drop empty slides before training.")
        if mask is None:
            mask = torch.ones(B, N, dtype=torch.bool, device=features.device)
        else:
            if mask.shape != (B, N):
                raise HistofmError(f"MIL mask must have shape {(B, N)} to match the features, got {tuple(mask.shape)}.")
            mask = mask.to(torch.bool)
            if not bool(mask.any(dim=1).all()):
                raise HistofmError("A MIL bag in the batch has no unmasked tile; every bag needs at least one.")
        return features, mask


# --------------------------------------------------------------------------- helpers shared by aggregators
def masked_softmax(logits: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax over ``dim`` with masked-out positions given exactly zero weight."""
    logits = logits.masked_fill(~mask, float("-inf"))
    return torch.softmax(logits, dim=dim)


def dropout_layer(p: float) -> nn.Module:
    """``nn.Dropout(p)``, or ``nn.Identity`` for ``p == 0`` (dropout at 0 still copies its input in training)."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x (B, N, D)`` over the real tiles of ``mask (B, N)`` -> ``(B, D)``."""
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


# --------------------------------------------------------------------------- registry
_AGGREGATORS: dict[str, Callable[..., MILAggregator]] = {}


def register_aggregator(name: str) -> Callable[[type[MILAggregator]], type[MILAggregator]]:
    """Class decorator adding an aggregator to :func:`build_aggregator` under ``name``."""

    def wrap(cls: type[MILAggregator]) -> type[MILAggregator]:
        if name in _AGGREGATORS:
            raise HistofmError(f"MIL aggregator {name!r} is registered twice; register the new aggregator under another name.")
        _AGGREGATORS[name] = cls
        return cls

    return wrap


def _ensure_loaded() -> None:
    import importlib

    # Importing the modules runs their @register_aggregator decorators.
    for module in ("pooling", "abmil", "clam", "transmil", "dsmil", "transformer", "moe"):
        try:
            importlib.import_module(f"histofm.mil.{module}")
        except ModuleNotFoundError as e:  # a module still being written is skipped
            if e.name != f"histofm.mil.{module}":
                raise


def list_aggregators() -> list[str]:
    """Sorted names accepted by :func:`build_aggregator`."""
    _ensure_loaded()
    return sorted(_AGGREGATORS)


def build_aggregator(name: str, in_dim: int, num_classes: int, **kwargs: object) -> MILAggregator:
    """Build a registered aggregator, e.g. ``build_aggregator("abmil", 1024, 2, gated=True)``."""
    _ensure_loaded()
    if name not in _AGGREGATORS:
        close = difflib.get_close_matches(name, list(_AGGREGATORS), n=3, cutoff=0.75)
        names = ", ".join(sorted(_AGGREGATORS))
        hint = f"did you mean {', '.join(close)}? (all: {names})" if close else f"choose one of {names}."
        raise HistofmError(f"Unknown MIL aggregator {name!r}; {hint}")
    try:
        return _AGGREGATORS[name](in_dim, num_classes, **kwargs)
    except TypeError as e:
        raise HistofmError(f"MIL aggregator {name!r} does not accept these options: {e}.") from None
