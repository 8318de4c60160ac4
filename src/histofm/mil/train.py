"""Weakly supervised slide-level training: fit with early stopping, predict, and the loss of each task.

A slide is a bag of tile embeddings ``(N, D)`` with one target: a class
(classification) or a follow-up time and event (survival, see
:mod:`histofm.mil.survival`). :func:`fit` trains an aggregator on a sequence of
bags (a list of tensors, or a :class:`~histofm.mil.data.BagDataset` that reads
each bag from disk when it is needed); given validation bags, it keeps the
weights of the epoch with the lowest validation loss and stops after
``patience`` epochs without improvement. Cross-validation over patient-grouped
folds is in :mod:`histofm.mil.cv`.

Losses: class-weighted cross-entropy (``w_c = n / (C n_c)``, from the training
part) for classification; discrete-time NLL or Cox for survival; plus the
aggregator's own ``aux_loss`` (CLAM's instance loss, DSMIL's stream losses) in
training only.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from histofm.errors import HistofmError
from histofm.mil.base import MILAggregator
from histofm.mil.data import Subset
from histofm.mil.survival import cox_loss, nll_loss
from histofm.utils import seed_everything


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


def _progress(total: int, description: str, enabled: bool) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"), disable=not enabled, transient=True,
    )
    return progress, progress.add_task(description, total=total, info="")


def _as_targets(labels: Sequence[int] | np.ndarray | torch.Tensor | Targets) -> Targets:
    return labels if isinstance(labels, Targets) else Targets.classes(labels)


@torch.no_grad()
def validation_loss(model: MILAggregator, bags: Sequence[torch.Tensor], target: Targets, config: MILTrainConfig,
                    class_weight: torch.Tensor | None, device: str | torch.device) -> float:
    """The task loss over all validation bags at once (Cox needs the whole risk set)."""
    logits, _ = predict_logits(model, bags, device, scores=False)
    loss = slide_loss(torch.from_numpy(logits).to(device, torch.float32), target.to(device), config, class_weight)
    return float(loss)


def fit(
    model: MILAggregator,
    bags: Sequence[torch.Tensor],
    labels: Sequence[int] | np.ndarray | torch.Tensor | Targets,
    config: MILTrainConfig = MILTrainConfig(),
    device: str | torch.device = "cpu",
    progress: bool = False,
    *,
    val_bags: Sequence[torch.Tensor] | None = None,
    val_labels: Sequence[int] | np.ndarray | torch.Tensor | Targets | None = None,
    log: Callable[[dict[str, Any]], None] | None = None,
    state: dict[str, Any] | None = None,
    save_state: Callable[[dict[str, Any]], None] | None = None,
) -> list[float]:
    """Train ``model`` on bags ``(N_i, D)``; returns the mean training loss of each epoch run.

    With ``val_bags``, the validation loss is computed after each epoch, the weights of
    the best epoch are restored at the end, and training stops after ``config.patience``
    epochs without improvement. ``log`` receives one record per epoch.

    ``save_state`` receives, after every epoch, everything needed to go on exactly as
    if never stopped (model, optimiser, epoch, early-stopping state, random-number
    generator states and the epoch records); passing such a dict back as ``state``
    resumes there, giving bit-identical weights on the same device and thread count.

    Raises:
        HistofmError: when a training or validation loss is NaN or infinite (diverging
            training, ``--lr`` too high); nothing is saved for such a run.
    """
    target = _as_targets(labels)
    if len(bags) != len(target) or not len(bags):
        raise HistofmError(f"fit() needs one label per bag and at least one bag, got {len(bags)} bags and {len(target)} labels.")
    seed_everything(config.seed)
    class_weight = None
    if config.task == "classification":
        counts = torch.bincount(target.labels, minlength=model.num_classes).float()  # type: ignore[arg-type]
        if config.class_weight:
            class_weight = (counts.sum() / (model.num_classes * counts.clamp_min(1))).to(device)  # inverse frequency
    val_target = None if val_labels is None else _as_targets(val_labels)
    use_val = val_bags is not None and val_target is not None and len(val_bags) > 0
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    gen = torch.Generator().manual_seed(config.seed)
    history: list[float] = []
    records: list[dict[str, Any]] = []
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    start, stopped = 0, False
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        history, records = list(state["history"]), list(state["records"])
        if state["best_model"] is not None:
            best = (float(state["best_val"]), int(state["best_epoch"]), state["best_model"])
        start, stopped = int(state["epoch"]), bool(state["stopped"])
    bar, task = _progress(config.epochs, f"training {config.model}", progress)
    with bar:
        bar.update(task, completed=start)
        for epoch in range(start, config.epochs):
            if stopped:
                break
            order = torch.randperm(len(bags), generator=gen).tolist()
            total, steps = 0.0, 0
            for s in range(0, len(order), config.batch_size):
                idx = order[s : s + config.batch_size]
                batch = []
                for i in idx:
                    b = bags[i]
                    if config.max_tiles is not None and b.shape[0] > config.max_tiles:
                        b = b[torch.randperm(b.shape[0], generator=gen)[: config.max_tiles]]
                    batch.append(b.to(device, torch.float32))
                x, mask = pad_bags(batch)
                t = target[idx].to(device)
                out = model(x, mask, labels=t.labels)
                loss = slide_loss(out.logits, t, config, class_weight)
                if out.aux_loss is not None:
                    loss = loss + out.aux_loss
                if not bool(torch.isfinite(loss)):
                    raise HistofmError(
                        f"The training loss of {config.model} became {float(loss.detach())} in epoch {epoch + 1} "
                        f"(diverging training, or features too large for float32); lower --lr (now {config.lr:g}) "
                        "or check the features, and train again."
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach())
                steps += 1
            history.append(total / steps)
            record: dict[str, Any] = {"epoch": epoch, "train_loss": history[-1], "val_loss": None}
            if use_val:
                val = validation_loss(model, val_bags, val_target, config, class_weight, device)  # type: ignore[arg-type]
                if not np.isfinite(val):
                    raise HistofmError(
                        f"The validation loss of {config.model} became {val} in epoch {epoch + 1} "
                        f"(diverging training); lower --lr (now {config.lr:g}) and train again."
                    )
                model.train()
                record["val_loss"] = val
                if best is None or val < best[0]:
                    best = (val, epoch, copy.deepcopy({k: v.detach().clone() for k, v in model.state_dict().items()}))
                stopped = config.patience > 0 and epoch - best[1] >= config.patience
                record["best_epoch"] = best[1]
            records.append(record)
            if log is not None:
                log(record)
            if save_state is not None:
                save_state({
                    "model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch + 1,
                    "stopped": stopped, "history": history, "records": records,
                    "best_val": None if best is None else best[0], "best_epoch": None if best is None else best[1],
                    "best_model": None if best is None else best[2],
                    "generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
                    **({"cuda_rng": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else {}),
                })
            bar.update(task, advance=1, info=f"loss {history[-1]:.4f}")
    if best is not None:
        model.load_state_dict(best[2])
    model.eval()
    return history


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
