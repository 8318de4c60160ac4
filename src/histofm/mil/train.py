"""Weakly supervised slide-level training: what is MIL's, for the one engine to train.

A slide is a bag of tile embeddings ``(N, D)`` with one target: a class
(classification) or a follow-up time and event (survival, see
:mod:`histofm.mil.survival`). Training runs through the engine
(:func:`histofm.train.fit`, driven by :mod:`histofm.train.mil`); this file holds
only MIL's part of it:

* :class:`MILObjective`: the aggregator and the slide loss, the engine's training unit;
* :class:`BagSamples`, :class:`TileSubset` and :class:`BagCollate`: bags as a map-style
  dataset, a random subset of tiles per bag and epoch (under the engine's per-sample
  seed), and padding of bags of different sizes into one batch with a mask;
* :func:`validation_loss`, :func:`predict_logits` and :func:`predict`;
* :func:`fit`, a deprecated plain loop kept only for ``histofm.eval.mil_task`` (floor 8 cannot
  import the engine); it goes when that task moves up a floor.

Losses: class-weighted cross-entropy (``w_c = n / (C n_c)``, from the training
part) for classification; discrete-time NLL or Cox for survival; plus the
aggregator's own ``aux_loss`` (CLAM's instance loss, DSMIL's stream losses) in
training only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from histofm.mil.base import MILAggregator
from histofm.mil.data import Subset
from histofm.mil.survival import cox_loss, nll_loss
from histofm.utils.objective import Objective


@dataclass(frozen=True)
class MILTrainConfig:
    """Settings of one training run (each is also a ``--set KEY=VALUE`` of ``mil train``).

    Attributes:
        model: aggregator name (see :func:`histofm.mil.list_aggregators`).
        model_kwargs: options of the aggregator (``{"gated": False}`` ...).
        epochs: most passes over the training slides.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        batch_size: slides per step (padded with a mask).
        max_tiles: if set, each training bag is a random subset of at most this many
            tiles every epoch (faster, and a regulariser); prediction uses all tiles.
        seed: seed of initialisation, shuffling and folds.
        task: ``"classification"`` or ``"survival"``.
        loss: survival loss, ``"nll"`` (discrete time) or ``"cox"``; ignored for classification.
        n_bins: time bins of the NLL loss (quantiles of the training event times).
        alpha: weight of the uncensored-only term of the NLL loss (0: plain likelihood).
        val_fraction: share of each training fold's patients held out for validation
            and early stopping (0 disables both).
        patience: epochs without a lower validation loss before stopping (0: never stop early).
        class_weight: weight classes by inverse frequency in the loss (classification).
        n_boot: bootstrap resamples of each metric's interval (0: no interval).
        precision: ``"fp32"``, ``"bf16"`` (autocast, fine on CPU) or ``"fp16"`` (CUDA, loss scaling).
    """

    model: str = "abmil"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    epochs: int = 20
    lr: float = 2e-4
    weight_decay: float = 1e-4
    batch_size: int = 1
    max_tiles: int | None = None
    seed: int = 0
    task: str = "classification"
    loss: str = "nll"
    n_bins: int = 4
    alpha: float = 0.0
    val_fraction: float = 0.2
    patience: int = 5
    class_weight: bool = True
    n_boot: int = 1000
    precision: str = "fp32"


@dataclass(frozen=True)
class Targets:
    """Slide targets: ``labels (n,)`` long for classification; ``bins``, ``times``, ``events`` for survival."""

    labels: torch.Tensor | None = None
    bins: torch.Tensor | None = None
    times: torch.Tensor | None = None
    events: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.labels if self.labels is not None else self.times)  # type: ignore[arg-type]

    def __getitem__(self, idx: Sequence[int] | np.ndarray) -> Targets:
        index = torch.as_tensor(np.asarray(idx, dtype=np.int64))
        return Targets(*[None if t is None else t[index] for t in (self.labels, self.bins, self.times, self.events)])

    @classmethod
    def classes(cls, labels: Sequence[int] | np.ndarray | torch.Tensor) -> Targets:
        return cls(labels=torch.as_tensor(np.asarray(labels), dtype=torch.long))

    @classmethod
    def survival(cls, times: np.ndarray, events: np.ndarray, bins: np.ndarray | None = None) -> Targets:
        return cls(
            bins=None if bins is None else torch.as_tensor(bins, dtype=torch.long),
            times=torch.as_tensor(np.asarray(times, dtype=np.float64)),
            events=torch.as_tensor(np.asarray(events, dtype=bool)),
        )

    def to(self, device: str | torch.device) -> Targets:
        return Targets(*[None if t is None else t.to(device) for t in (self.labels, self.bins, self.times, self.events)])


def slide_loss(logits: torch.Tensor, target: Targets, config: MILTrainConfig,
               class_weight: torch.Tensor | None = None) -> torch.Tensor:
    """The task's loss of slide logits ``(B, C)`` (without the aggregator's aux loss)."""
    if config.task == "survival":
        if config.loss == "cox":
            return cox_loss(logits[:, 0], target.times, target.events)  # type: ignore[arg-type]
        return nll_loss(logits, target.bins, target.events, alpha=config.alpha)  # type: ignore[arg-type]
    return F.cross_entropy(logits, target.labels, weight=class_weight)  # type: ignore[arg-type]


def pad_bags(bags: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack bags ``(N_i, D)`` into ``(B, max N, D)`` zero-padded features and a ``(B, max N)`` mask."""
    n_max = max(b.shape[0] for b in bags)
    x = bags[0].new_zeros(len(bags), n_max, bags[0].shape[1])
    mask = torch.zeros(len(bags), n_max, dtype=torch.bool, device=bags[0].device)
    for i, b in enumerate(bags):
        x[i, : b.shape[0]] = b
        mask[i, : b.shape[0]] = True
    return x, mask


def class_weights(target: Targets, num_classes: int, config: MILTrainConfig) -> torch.Tensor | None:
    """Inverse-frequency class weights ``(C,)`` of the training labels, or ``None`` (survival, or switched off)."""
    if config.task != "classification" or not config.class_weight:
        return None
    counts = torch.bincount(target.labels, minlength=num_classes).float()  # type: ignore[arg-type]
    return counts.sum() / (num_classes * counts.clamp_min(1))


class MILObjective(Objective):
    """An aggregator and its slide loss: the unit the engine trains.

    ``forward`` takes the batch of :class:`BagCollate` (``x (B, N, D)``, ``mask (B, N)`` and the
    targets) and returns ``loss`` (slide loss plus the aggregator's ``aux_loss``), ``slide_loss``
    and ``aux_loss``. The class weights are a buffer, so they follow the device and the checkpoint.
    """

    export_name = "aggregator"

    def __init__(self, aggregator: MILAggregator, config: MILTrainConfig, class_weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.aggregator, self.config = aggregator, config
        self.register_buffer("class_weight", class_weight.float() if class_weight is not None else None)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        target = Targets(batch.get("labels"), batch.get("bins"), batch.get("times"), batch.get("events"))
        out = self.aggregator(batch["x"], batch["mask"], labels=target.labels)  # logits (B, C)
        loss = slide_loss(out.logits.float(), target, self.config, self.class_weight)
        result = {"slide_loss": loss.detach()}
        if out.aux_loss is not None:
            result["aux_loss"] = out.aux_loss.detach()
            loss = loss + out.aux_loss
        return {"loss": loss, **result}

    def exported_module(self) -> nn.Module:
        return self.aggregator

    def export_info(self) -> dict[str, Any]:
        """The aggregator's class, input width, outputs and task (``mil train`` also keeps the options in config.json)."""
        return {"aggregator_class": type(self.aggregator).__name__, "in_dim": self.aggregator.in_dim,
                "num_classes": self.aggregator.num_classes, "task": self.config.task}


class BagSamples(Dataset):
    """Bags as a map-style dataset: item ``i`` is ``(bag (N_i, D) float32, i)``; the index finds the target."""

    def __init__(self, bags: Sequence[torch.Tensor]) -> None:
        self.bags = bags

    def __len__(self) -> int:
        return len(self.bags)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.bags[i].to(dtype=torch.float32), i


class TileSubset:
    """At most ``max_tiles`` random tiles of a bag, in a random order when ``shuffle`` (drawn from the
    engine's per-sample seed, so resumable).

    The tiles of a bag have no order, yet an aggregator that lays them out (TransMIL's square grid
    and its convolutions) sees a fixed order as a fingerprint of the bag and can memorise training
    bags by it; a fresh order each epoch takes that away. Order-free aggregators are unaffected.
    """

    def __init__(self, max_tiles: int | None = None, shuffle: bool = False) -> None:
        self.max_tiles, self.shuffle = max_tiles, shuffle

    def __call__(self, bag: torch.Tensor) -> torch.Tensor:  # (N, D) -> (min(N, max_tiles), D)
        n = bag.shape[0]
        if self.shuffle:
            bag = bag[torch.randperm(n)]
        elif self.max_tiles is None or n <= self.max_tiles:
            return bag
        else:
            bag = bag[torch.randperm(n)]
        return bag if self.max_tiles is None else bag[: self.max_tiles]


class BagCollate:
    """``[(bag, index), ...]`` -> ``{"x": (B, max N, D), "mask": (B, max N), <targets of the indices>}``."""

    def __init__(self, target: Targets) -> None:
        self.target = target

    def __call__(self, items: list[tuple[torch.Tensor, int]]) -> dict[str, torch.Tensor]:
        x, mask = pad_bags([bag for bag, _ in items])
        t = self.target[[i for _, i in items]]
        fields = {"labels": t.labels, "bins": t.bins, "times": t.times, "events": t.events}
        return {"x": x, "mask": mask, **{k: v for k, v in fields.items() if v is not None}}


@torch.no_grad()
def validation_loss(model: MILAggregator, bags: Sequence[torch.Tensor], target: Targets, config: MILTrainConfig,
                    class_weight: torch.Tensor | None, device: str | torch.device) -> float:
    """The task loss over all validation bags at once (Cox needs the whole risk set)."""
    logits, _ = predict_logits(model, bags, device, scores=False)
    loss = slide_loss(torch.from_numpy(logits).to(device, torch.float32), target.to(device), config, class_weight)
    return float(loss)


@torch.no_grad()
def predict_logits(
    model: MILAggregator, bags: Sequence[torch.Tensor], device: str | torch.device = "cpu", scores: bool = True
) -> tuple[np.ndarray, list[np.ndarray | None]]:
    """Slide logits ``(n, C)`` float64 and per-tile scores (one array per bag, or ``None``), bag by bag."""
    model.to(device).eval()
    logits, tile_scores = [], []
    for i in range(len(bags)):
        out = model(bags[i].to(device, torch.float32).unsqueeze(0))
        logits.append(out.logits[0].double().cpu().numpy())
        tile_scores.append(None if (out.scores is None or not scores) else out.scores[0].float().cpu().numpy())
    return np.stack(logits), tile_scores


def predict(
    model: MILAggregator, bags: Sequence[torch.Tensor], device: str | torch.device = "cpu"
) -> tuple[np.ndarray, list[np.ndarray | None]]:
    """Class probabilities ``(n, C)`` and per-tile scores (one array per bag, or ``None``), bag by bag."""
    logits, scores = predict_logits(model, bags, device)
    return torch.softmax(torch.from_numpy(logits), -1).numpy(), scores  # float64: no ties at 1.0


def subset(bags: Sequence[torch.Tensor], indices: Sequence[int] | np.ndarray) -> Sequence[torch.Tensor]:
    """The bags at ``indices``, without reading them."""
    return Subset(bags, [int(i) for i in indices])
