"""Training the nucleus head on the bundled HGSC field, and saving / loading cell models.

Data: ``hgsc_nest`` (1500 x 1500 H&E, histolytics, BSD-3) with its instance mask and
type mask (1 connective, 2 inflammatory, 3 neoplastic). The split is the one of the
nucleus-type task (:mod:`histofm.eval.nuclei`): a 3 x 3 grid of 500 px blocks, the
blocks with even ``row + column`` train (5 blocks), the others are held out (4 blocks).
Training crops lie wholly inside training blocks, so no held-out pixel is ever seen.

Each step draws random ``tile x tile`` crops, flips and rotates them by multiples of
90 degrees, and builds the HoVer-Net targets from the augmented instance mask (so the
HV maps rotate with the image, as they must). The loop is small and task-specific,
like :mod:`histofm.mil.train`; a checkpoint is one safetensors file whose metadata
holds the :class:`~histofm.cells.hovernet.HoVerNetConfig`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from histofm.cells.hovernet import (
    HoVerNetConfig,
    HoVerNetViT,
    build_hovernet,
    hovernet_loss,
    hovernet_targets,
)
from histofm.errors import HistofmError
from histofm.utils import atomic_path

BLOCK = 500  # px side of the split blocks (histofm.eval.nuclei.BLOCK)


def load_hgsc() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The bundled field: RGB ``(1500, 1500, 3)`` uint8, instance mask and type mask ``(1500, 1500)``."""
    from PIL import Image

    from histofm.data import sample_path

    image = np.asarray(Image.open(sample_path("hgsc_nest")).convert("RGB"))
    inst = np.load(sample_path("hgsc_nest_inst_mask"))["nuc_raster"].astype(np.int32)
    types = np.load(sample_path("hgsc_nest_type_mask"))["nuc_raster"].astype(np.int64)
    return image, inst, types


def split_blocks(shape: tuple[int, int], train: bool) -> list[tuple[int, int, int, int]]:
    """``(y0, x0, y1, x1)`` of the training (``row + column`` even) or held-out blocks of the 3 x 3 grid."""
    rows, cols = shape[0] // BLOCK, shape[1] // BLOCK
    return [
        (r * BLOCK, c * BLOCK, (r + 1) * BLOCK, (c + 1) * BLOCK)
        for r in range(rows) for c in range(cols) if ((r + c) % 2 == 0) == train
    ]


class CropSampler:
    """Random augmented crops with HoVer-Net targets from ``regions`` of one annotated image."""

    def __init__(
        self, image: np.ndarray, inst: np.ndarray, types: np.ndarray, regions: list[tuple[int, int, int, int]],
        tile: int, mean: tuple[float, float, float], std: tuple[float, float, float], seed: int = 0,
    ) -> None:
        for y0, x0, y1, x1 in regions:
            if y1 - y0 < tile or x1 - x0 < tile:
                raise HistofmError(f"A training region of {y1 - y0} x {x1 - x0} px is smaller than the {tile} px tile; lower the tile.")
        self.image, self.inst, self.types, self.regions, self.tile = image, inst, types, regions, tile
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)
        self.rng = np.random.default_rng(seed)

    def crop(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One augmented crop: image ``(t, t, 3)``, instance and type masks ``(t, t)``."""
        y0, x0, y1, x1 = self.regions[self.rng.integers(len(self.regions))]
        y = int(self.rng.integers(y0, y1 - self.tile + 1))
        x = int(self.rng.integers(x0, x1 - self.tile + 1))
        sl = (slice(y, y + self.tile), slice(x, x + self.tile))
        parts = [self.image[sl], self.inst[sl], self.types[sl]]
        k, flip = int(self.rng.integers(4)), bool(self.rng.integers(2))
        parts = [np.rot90(p, k, axes=(0, 1)) for p in parts]
        if flip:
            parts = [p[:, ::-1] for p in parts]
        return tuple(np.ascontiguousarray(p) for p in parts)  # type: ignore[return-value]

    def batch(self, n: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``n`` normalised crops ``(n, 3, t, t)`` and their targets ``np (n, t, t)``, ``hv (n, 2, t, t)``, ``tp (n, t, t)``."""
        images, targets = [], []
        for _ in range(n):
            img, inst, types = self.crop()
            images.append((torch.from_numpy(img).permute(2, 0, 1).float() / 255 - self.mean) / self.std)
            targets.append(hovernet_targets(inst, types))
        return torch.stack(images), {k: torch.from_numpy(np.stack([t[k] for t in targets])) for k in targets[0]}


@dataclass(frozen=True)
class CellTrainConfig:
    """Optimisation settings of :func:`train_hovernet` (AdamW, cosine learning rate)."""

    steps: int = 300
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    device: str = "cpu"
    progress: bool = False


def train_hovernet(
    model: HoVerNetViT, sampler: CropSampler, cfg: CellTrainConfig, out_dir: str | os.PathLike[str] | None = None
) -> list[dict[str, float]]:
    """Train the decoder and heads (and the encoder unless frozen); returns per-step losses.

    With ``out_dir`` the loss curve is saved as ``loss_curve.png`` and the history as ``log.jsonl``.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    history: list[dict[str, float]] = []
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   TextColumn("{task.fields[info]}"), disable=not cfg.progress)
    with bar:
        task = bar.add_task("training cell head", total=cfg.steps, info="")
        for step in range(cfg.steps):
            x, target = sampler.batch(cfg.batch_size)
            x, target = x.to(device), {k: v.to(device) for k, v in target.items()}
            losses = hovernet_loss(model(x), target)
            opt.zero_grad(set_to_none=True)
            losses["loss"].backward()
            torch.nn.utils.clip_grad_norm_(params, 5.0)
            opt.step()
            sched.step()
            history.append({"step": step, **{k: float(v.detach()) for k, v in losses.items()}})
            bar.update(task, advance=1, info=f"loss {history[-1]['loss']:.3f}")
    model.eval()
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / "log.jsonl") as tmp:
            tmp.write_text("".join(json.dumps(h) + "\n" for h in history))
        plot_losses(history, out / "loss_curve.png")
    return history


def plot_losses(history: list[dict[str, float]], path: Path) -> None:
    """The total loss and its six terms per step, saved as a PNG (atomically)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.6), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    steps = [h["step"] for h in history]
    for key in ("loss", "np_ce", "np_dice", "hv_mse", "hv_msge", "tp_ce", "tp_dice"):
        ax.plot(steps, [h[key] for h in history], lw=1.6 if key == "loss" else 0.8, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title("nucleus head (HoVer-Net loss)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def save_cell_model(model: HoVerNetViT, cfg: HoVerNetConfig, path: str | os.PathLike[str]) -> Path:
    """Encoder, decoder and heads in one safetensors file; the config in its metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"format": "histofm-cells", "config": json.dumps(dataclasses.asdict(cfg))}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)
    return path


def load_cell_model(path: str | os.PathLike[str]) -> tuple[HoVerNetViT, HoVerNetConfig]:
    """Rebuild a model saved by :func:`save_cell_model` (eval mode, on the CPU)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise HistofmError(f"Cell model checkpoint not found: {path}; check --checkpoint.")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
    except Exception as e:  # safetensors raises its own types for corrupt files
        raise HistofmError(f"{path.name} is not a readable safetensors file ({type(e).__name__}); pass a checkpoint "
                           "saved by histofm's cell training to --checkpoint.") from None
    if meta.get("format") != "histofm-cells":
        raise HistofmError(f"{path.name} is not a histofm cell model (no cell config in its metadata); pass a "
                           "checkpoint saved by histofm.cells.train.save_cell_model to --checkpoint.")
    raw: dict[str, Any] = json.loads(meta["config"])
    for key in ("type_names", "layer_indices", "widths", "mean", "std"):
        if raw.get(key) is not None:
            raw[key] = tuple(raw[key])
    cfg = HoVerNetConfig(**raw)
    model = build_hovernet(cfg)
    model.load_state_dict(state, strict=True)
    return model.eval(), cfg
