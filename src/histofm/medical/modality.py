"""Worked example beyond histopathology: which imaging modality is this crop from?

The task, on the real DICOM files bundled with histofm (2 x CR radiographs, 2 x CT,
2 x MR, 2 x ultrasound; see ``src/histofm/data/samples/ATTRIBUTION.md``):

1. every file is read with :func:`~histofm.medical.read_dicom`, each slice is
   displayed with the header's window (else its 0.5-99.5 percentile range) as
   three-channel 8-bit, resized so its shorter side is ``context`` pixels, and
   ``per_file`` square crops of ``size`` pixels are cut at seeded positions
   (crops that are mostly black background are skipped, like glass in a slide);
2. the crops are split **by file**: fold ``k`` tests on the ``k``-th file of every
   modality and trains on the others, so no file (no patient, no scanner setting)
   is on both sides of a split;
3. features come from any frozen encoder (class token + mean patch token for ViTs,
   :func:`histofm.eval.embed.embed_images`) or from an intensity histogram;
4. a cosine kNN (:func:`histofm.eval.knn.knn_predict`: ``k`` neighbours, votes
   weighted by ``exp(cos / T)``) predicts the modality of each test crop, and the
   metric is the balanced accuracy (the mean per-class recall; chance is
   ``1 / 4``), averaged over the folds.

:func:`pretrain_encoder` pretrains a small ViT with a pathology recipe (the
engine, :func:`histofm.train.fit`, with the method's default tissue-tile view
augmentations) on the TRAINING crops of a fold only, so the test files stay unseen
even without labels. :func:`modality_benchmark` puts it together: the SSL
encoder, the same encoder at random initialisation, and the histogram baseline.
What the numbers mean, and what transfers from pathology models to other
modalities, is discussed in ``docs/beyond-histopathology.md``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from histofm.errors import HistofmError
from histofm.medical.dicom import read_dicom, to_rgb_slices


def bundled_dicom_files() -> list[Path]:
    """The real DICOM files shipped with histofm (sorted by name)."""
    from histofm.data import SAMPLES_DIR

    return sorted((SAMPLES_DIR / "dicom").glob("*.dcm"))


@dataclass(frozen=True)
class CropConfig:
    """How crops are cut from the DICOM slices.

    Attributes:
        size: crop side in pixels (the encoder's input side).
        context: each slice is resized so its shorter side has this many pixels before
            cropping, so a crop covers the same fraction of every image whatever its
            pixel count (DICOM pixel spacings differ by 10x between modalities).
        per_file: crops per file, spread evenly over its slices.
        min_foreground: a crop is kept only if at least this fraction of its pixels is
            brighter than ``foreground_level`` (skips empty air and black borders).
        foreground_level: grey level (0-255) above which a pixel counts as foreground.
        seed: crop positions.
    """

    size: int = 64
    context: int = 256
    per_file: int = 48
    min_foreground: float = 0.3
    foreground_level: int = 16
    seed: int = 0


@dataclass
class ModalityCrops:
    """Crops with their modality and source file.

    Attributes:
        images: ``(N, S, S, 3)`` uint8 RGB crops.
        labels: ``(N,)`` modality index into ``classes``.
        file_ids: ``(N,)`` index into ``files`` of the file each crop comes from.
        classes: modality names (DICOM ``Modality``), sorted.
        files: source file names.
        file_labels: modality index of each file.
    """

    images: np.ndarray
    labels: np.ndarray
    file_ids: np.ndarray
    classes: list[str]
    files: list[str]
    file_labels: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> ModalityCrops:
        """The crops at ``index`` (same classes and files)."""
        return ModalityCrops(
            self.images[index], self.labels[index], self.file_ids[index], self.classes, self.files, self.file_labels
        )


def _resize_shorter(rgb: np.ndarray, side: int) -> np.ndarray:
    h, w = rgb.shape[:2]
    scale = side / min(h, w)
    size = (max(side, round(w * scale)), max(side, round(h * scale)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR))


def crops_from_slices(slices: Sequence[np.ndarray], n: int, cfg: CropConfig, rng: np.random.Generator) -> np.ndarray:
    """``n`` crops ``(n, S, S, 3)`` uint8 from RGB slices ``(H, W, 3)``, spread evenly over the slices.

    Positions are drawn at random; a crop whose foreground fraction is below
    ``cfg.min_foreground`` is redrawn (up to 50 tries per crop, then the most
    filled candidate seen is kept, so every file gives ``n`` crops).
    """
    if cfg.size > cfg.context:
        raise HistofmError(f"Crop size {cfg.size} is larger than the context {cfg.context}; lower size or raise context.")
    resized = [_resize_shorter(s, cfg.context) for s in slices]
    out = []
    for i in range(n):
        img = resized[i * len(resized) // n]  # slice i of n, evenly spread
        h, w = img.shape[:2]
        best, best_fg = None, -1.0
        for _ in range(50):
            y, x = int(rng.integers(0, h - cfg.size + 1)), int(rng.integers(0, w - cfg.size + 1))
            crop = img[y : y + cfg.size, x : x + cfg.size]
            fg = float((crop.max(-1) > cfg.foreground_level).mean())
            if fg > best_fg:
                best, best_fg = crop, fg
            if fg >= cfg.min_foreground:
                break
        out.append(best)
    return np.stack(out)


def modality_crops(paths: Sequence[str | os.PathLike[str]] | None = None, cfg: CropConfig = CropConfig()) -> ModalityCrops:
    """Crops of every DICOM file in ``paths`` (default: the bundled files), labelled by DICOM Modality.

    Radiographs stored as ``DX`` are grouped with ``CR`` (both are projection X-ray).
    """
    paths = [Path(p) for p in (paths if paths is not None else bundled_dicom_files())]
    if not paths:
        raise HistofmError("No DICOM files given; pass at least one .dcm file per modality.")
    rng = np.random.default_rng(cfg.seed)
    per_file, modalities = [], []
    for p in paths:
        image = read_dicom(p)
        modalities.append("CR" if image.modality == "DX" else image.modality)
        per_file.append(crops_from_slices(to_rgb_slices(image), cfg.per_file, cfg, rng))
    classes = sorted(set(modalities))
    file_labels = [classes.index(m) for m in modalities]
    images = np.concatenate(per_file)  # (F * per_file, S, S, 3)
    file_ids = np.repeat(np.arange(len(paths)), cfg.per_file)
    labels = np.asarray(file_labels)[file_ids]
    return ModalityCrops(images, labels, file_ids, classes, [p.name for p in paths], file_labels)


def file_folds(crops: ModalityCrops) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(train_idx, test_idx)`` per fold, split by file.

    The files of each modality are numbered in name order; fold ``k`` tests on file
    ``k`` of every modality (modalities with fewer files are skipped in that fold's
    test set) and trains on all other files. The number of folds is the largest
    number of files of one modality; every modality needs at least two files so that
    each test file has a training file of its class.
    """
    per_class: dict[int, list[int]] = {}
    for f, c in enumerate(crops.file_labels):
        per_class.setdefault(c, []).append(f)
    short = [crops.classes[c] for c, fs in per_class.items() if len(fs) < 2]
    if short:
        raise HistofmError(
            f"Modality {short[0]} has a single file, so a split by file leaves it nothing to train on; "
            "add a second file of it or leave it out."
        )
    n_folds = max(len(fs) for fs in per_class.values())
    folds = []
    for k in range(n_folds):
        test_files = {fs[k] for fs in per_class.values() if k < len(fs)}
        is_test = np.isin(crops.file_ids, sorted(test_files))
        folds.append((np.flatnonzero(~is_test), np.flatnonzero(is_test)))
    return folds


# ---------------------------------------------------------------------------- features
def histogram_features(images: np.ndarray, bins: int = 16) -> np.ndarray:
    """Per-channel intensity histograms ``(N, 3 * bins)`` of uint8 crops ``(N, H, W, 3)``, each summing to 1 per channel."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise HistofmError(f"Histogram features need RGB crops (N, H, W, 3), got shape {images.shape}.")
    idx = (images.astype(np.int64) * bins) // 256  # (N, H, W, 3) bin of each value
    n, hw = len(images), images.shape[1] * images.shape[2]
    out = np.zeros((n, 3, bins), dtype=np.float32)
    for c in range(3):
        flat = idx[..., c].reshape(n, hw) + np.arange(n)[:, None] * bins
        out[:, c] = np.bincount(flat.ravel(), minlength=n * bins).reshape(n, bins) / hw
    return out.reshape(n, 3 * bins)


def encoder_features(
    model: nn.Module,
    images: np.ndarray,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    batch_size: int = 128,
) -> np.ndarray:
    """Frozen-encoder embeddings ``(N, E)`` of uint8 crops ``(N, H, W, 3)``.

    ``mean``/``std`` default to the model's registered normalisation (ImageNet for
    generic architectures); ViTs give class token + mean patch token.
    """
    from histofm.constants import IMAGENET_MEAN, IMAGENET_STD
    from histofm.eval.embed import embed_images

    name = getattr(model, "histofm_name", None)
    if mean is None or std is None:
        info = None
        if name is not None:
            import histofm

            info = histofm.model_info(name)
        mean = mean or (info.mean if info else IMAGENET_MEAN)
        std = std or (info.std if info else IMAGENET_STD)
    return embed_images(model, torch.from_numpy(np.ascontiguousarray(images)), mean, std, batch_size=batch_size)


# ---------------------------------------------------------------------------- evaluation
@dataclass(frozen=True)
class KnnResult:
    """kNN modality classification over the file folds.

    Attributes:
        name: the feature set.
        fold_accuracy: balanced accuracy of each fold.
        confusion: ``(C, C)`` counts over all folds (rows: true modality, columns: predicted).
    """

    name: str
    fold_accuracy: tuple[float, ...]
    confusion: np.ndarray

    @property
    def accuracy(self) -> float:
        """Balanced accuracy averaged over the folds."""
        return float(np.mean(self.fold_accuracy))


def knn_modality(
    features: np.ndarray | Sequence[np.ndarray],
    crops: ModalityCrops,
    folds: Sequence[tuple[np.ndarray, np.ndarray]],
    name: str = "features",
    k: int = 20,
    temperature: float = 0.07,
) -> KnnResult:
    """Cosine kNN modality prediction on each fold.

    Args:
        features: ``(N, E)`` features of all crops, or one ``(N, E)`` array per fold (for
            encoders pretrained per fold).
        crops: the crops (labels).
        folds: from :func:`file_folds`.
        name: label of the result.
        k, temperature: kNN neighbours and vote temperature.
    """
    from histofm.eval.knn import knn_predict
    from histofm.eval.metrics import balanced_accuracy

    per_fold = list(features) if isinstance(features, (list, tuple)) else [features] * len(folds)
    if len(per_fold) != len(folds):
        raise HistofmError(f"Got {len(per_fold)} feature arrays for {len(folds)} folds; give one per fold or one for all.")
    C = len(crops.classes)
    confusion = np.zeros((C, C), dtype=np.int64)
    accs = []
    for feats, (tr, te) in zip(per_fold, folds):
        feats = np.asarray(feats)
        if len(feats) != len(crops):
            raise HistofmError(f"{len(feats)} feature rows for {len(crops)} crops; embed every crop.")
        probs = knn_predict(feats[tr], crops.labels[tr], feats[te], k=k, temperature=temperature, num_classes=C)
        pred = probs.argmax(1)
        accs.append(balanced_accuracy(crops.labels[te], pred))
        np.add.at(confusion, (crops.labels[te], pred), 1)
    return KnnResult(name, tuple(accs), confusion)


# ---------------------------------------------------------------------------- pretraining
class _CropDataset(torch.utils.data.Dataset):
    """uint8 crops as PIL images, for the engine's view transforms."""

    def __init__(self, images: np.ndarray) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index])


@dataclass(frozen=True)
class PretrainConfig:
    """A short pretraining run of a small ViT on crops.

    Attributes:
        method: a name of :func:`histofm.methods.registry.list_methods`.
        arch: the backbone architecture; ``backbone`` overrides its constructor arguments.
        method_overrides: fields of the method's config (head sizes, augmentation recipe); the
            defaults are SimCLR's, so replace them when you change ``method``.
        steps, batch_size, lr, warmup_steps, weight_decay: the engine's schedule.
        seed: initialisation, data order and augmentations.
        progress: show the engine's progress bar.
    """

    method: str = "simclr"
    arch: str = "vit_tiny_patch16_224"
    backbone: dict[str, Any] = field(
        default_factory=lambda: {"patch_size": 8, "embed_dim": 96, "depth": 3, "num_heads": 3}
    )
    method_overrides: dict[str, Any] = field(
        default_factory=lambda: {"proj_hidden_dim": 256, "proj_dim": 64, "augment": "batch"}
    )
    steps: int = 150
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 15
    weight_decay: float = 0.05
    seed: int = 0
    progress: bool = False


def build_encoder(cfg: PretrainConfig, img_size: int) -> tuple[Any, Callable[[Any], Any]]:
    """The method (with a freshly initialised backbone, seeded) and its view transform."""
    from histofm.methods.registry import build_method
    from histofm.utils import seed_everything

    seed_everything(cfg.seed)
    overrides = {**cfg.method_overrides, "backbone_kwargs": dict(cfg.backbone)}
    return build_method(cfg.method, cfg.arch, img_size=img_size, overrides=overrides)


def pretrain_encoder(
    images: np.ndarray, cfg: PretrainConfig = PretrainConfig(), out_dir: str | os.PathLike[str] | None = None
) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Pretrain ``cfg.method`` on uint8 crops ``(N, S, S, 3)``; returns the backbone and the engine's history."""
    from histofm.train import TrainConfig, fit

    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or len(images) < 2:
        raise HistofmError(f"Pretraining needs at least two RGB crops (N, S, S, 3), got shape {images.shape}.")
    method, transform = build_encoder(cfg, images.shape[1])
    train_cfg = TrainConfig(
        steps=cfg.steps, batch_size=min(cfg.batch_size, len(images)), lr=cfg.lr, warmup_steps=min(cfg.warmup_steps, cfg.steps),
        weight_decay=cfg.weight_decay, seed=cfg.seed, device="cpu", progress=cfg.progress,
        out_dir=None if out_dir is None else str(out_dir), ckpt_every=0, tensorboard=False,
        monitor_every=max(cfg.steps // 5, 1), monitor_samples=min(128, len(images)),
    )
    history = fit(method, _CropDataset(images), train_cfg, transform=transform)
    return method.backbone.eval(), history


@dataclass
class BenchmarkResult:
    """What :func:`modality_benchmark` measured."""

    results: dict[str, KnnResult]
    histories: list[list[dict[str, Any]]]
    crops: ModalityCrops
    folds: list[tuple[np.ndarray, np.ndarray]]

    def table(self) -> str:
        """A Markdown table: feature set, per-fold and mean balanced accuracy."""
        n = len(self.folds)
        lines = ["| features | " + " | ".join(f"fold {k}" for k in range(n)) + " | mean |", "|---" * (n + 2) + "|"]
        for r in self.results.values():
            lines.append(f"| {r.name} | " + " | ".join(f"{a:.3f}" for a in r.fold_accuracy) + f" | {r.accuracy:.3f} |")
        return "\n".join(lines)


def modality_benchmark(
    crops: ModalityCrops | None = None,
    pretrain: PretrainConfig = PretrainConfig(),
    extra_encoders: dict[str, nn.Module] | None = None,
    k: int = 20,
) -> BenchmarkResult:
    """kNN modality classification, split by file, for three (or more) feature sets.

    * ``ssl``: the ``pretrain`` encoder pretrained on each fold's training crops;
    * ``random init``: the same architecture, same seed, no training;
    * ``histogram``: per-channel 16-bin intensity histograms;
    * any ``extra_encoders`` (frozen, e.g. an encoder pretrained on H&E tiles).
    """
    crops = crops if crops is not None else modality_crops()
    folds = file_folds(crops)
    results: dict[str, KnnResult] = {}
    results["histogram"] = knn_modality(histogram_features(crops.images), crops, folds, "intensity histogram", k)
    random_backbone = build_encoder(pretrain, crops.images.shape[1])[0].backbone.eval()
    results["random"] = knn_modality(
        encoder_features(random_backbone, crops.images), crops, folds, "ViT, random init", k
    )
    feats, histories = [], []
    for tr, _ in folds:
        backbone, history = pretrain_encoder(crops.images[tr], pretrain)
        feats.append(encoder_features(backbone, crops.images))
        histories.append(history)
    results["ssl"] = knn_modality(feats, crops, folds, f"ViT, {pretrain.method} on train-fold crops", k)
    for name, model in (extra_encoders or {}).items():
        results[name] = knn_modality(encoder_features(model, crops.images), crops, folds, name, k)
    return BenchmarkResult(results, histories, crops, folds)
