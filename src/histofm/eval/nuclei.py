"""A real labelled task from bundled data: nucleus-type classification on an HGSC tumour-nest field.

Data: the 1500 x 1500 H&E field ``hgsc_nest`` (high-grade serous ovarian carcinoma,
histolytics, BSD-3) with an instance mask and a per-pixel type mask (1 connective,
2 inflammatory, 3 neoplastic). Each of the 1,294 labelled nuclei becomes a
``crop x crop`` patch (48 px by default) centred on its centre of mass; its class
is the majority type of its pixels (4 nuclei have mixed pixels; taking the
maximum type instead, as the measurement in the project's baselines did, moves 4
nuclei from inflammatory to connective).

Split by image region, so that overlapping neighbouring crops never straddle the
split: the field is cut into a 3 x 3 grid of 500 px blocks and a nucleus is in
the training set when its block's ``row + column`` is even (a checkerboard:
686 training and 608 test nuclei).

Every encoder is reported beside two references measured in the same run:
a colour histogram (8 bins per RGB channel) and the same architecture at random
initialisation. Protocols: weighted kNN, a linear probe with its regularisation
chosen on a validation split of the training nuclei, and SimpleShot few-shot.

Stain shift (the stable API other modules use):

* :func:`shifted_test_crops` ``(crops, shifts) -> {"clean": crops, name: shifted crops}``
  applies the named shifts of :data:`histofm.data.stain.STAIN_SHIFTS` (HED scale/bias at
  fixed strengths and seeds, Macenko re-staining to a second real H&E source).
* :func:`evaluate_features_shifted` ``(train_x, train_y, {name: test_x}, test_y) ->
  {name: {protocol: {metric: MetricSummary}}}`` fits the kNN index, the linear probe
  and the few-shot prototypes ONCE on the training features of the ORIGINAL stain and
  scores every test set with them; the ``"clean"`` entry equals :func:`evaluate_features`.
* :func:`run_nuclei` ``(..., stain_shifts=names)`` returns one :class:`NucleiRow` per
  feature set, protocol and stain (``row.shift``: ``"clean"`` or the shift's name).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from histofm.errors import HistofmError
from histofm.eval.fewshot import fewshot_episodes
from histofm.eval.knn import knn_predict
from histofm.eval.linear import linear_probe
from histofm.eval.metrics import MetricSummary, summarize

CLASS_NAMES = ("connective", "inflammatory", "neoplastic")
BLOCK = 500  # px side of the split blocks

# Balanced accuracy measured with peer libraries on these machines (see the project's BASELINES.md).
BASELINES = {
    "colour histogram": {"knn": 0.679, "linear": 0.726},
    "ViT-Ti/8 48 px random init (timm)": {"knn": 0.678, "linear": 0.691},
}


@dataclass(frozen=True)
class NucleiTask:
    """Crops, labels and the region split of the nucleus-type task.

    Attributes:
        crops: ``(n, crop, crop, 3)`` uint8 RGB.
        labels: ``(n,)`` in ``0..2`` (see :data:`CLASS_NAMES`).
        centers: ``(n, 2)`` centre of mass ``(y, x)`` in field pixels.
        train: ``(n,)`` True for training nuclei.
    """

    crops: np.ndarray
    labels: np.ndarray
    centers: np.ndarray
    train: np.ndarray
    class_names: tuple[str, ...] = CLASS_NAMES


@functools.lru_cache(maxsize=2)
def load_nuclei_task(crop: int = 48) -> NucleiTask:
    """Build the task from the bundled field and masks (cached per process: treat the arrays as read-only)."""
    from PIL import Image
    from scipy import ndimage

    from histofm.data import sample_path

    if crop < 8 or crop > 256:
        raise HistofmError(f"--crop must be between 8 and 256 pixels, got {crop}.")
    image = np.asarray(Image.open(sample_path("hgsc_nest")).convert("RGB"))
    types = np.load(sample_path("hgsc_nest_type_mask"))["nuc_raster"]
    inst = np.load(sample_path("hgsc_nest_inst_mask"))["nuc_raster"]
    ids = np.unique(inst)
    ids = ids[ids > 0]
    centers = np.array(ndimage.center_of_mass(np.ones_like(inst), inst, ids))  # (n, 2) (y, x)
    # Majority type of each nucleus' labelled pixels: a (instance, type) histogram.
    flat = inst.ravel() > 0
    pair = np.zeros((int(inst.max()) + 1, 4), dtype=np.int64)
    np.add.at(pair, (inst.ravel()[flat], types.ravel()[flat]), 1)
    pair[:, 0] = 0  # unlabelled pixels do not vote
    keep = pair[ids].sum(1) > 0
    labels = pair[ids].argmax(1) - 1  # 0 connective, 1 inflammatory, 2 neoplastic
    ids, centers, labels = ids[keep], centers[keep], labels[keep]

    half = crop // 2
    padded = np.pad(image, ((crop, crop), (crop, crop), (0, 0)), mode="reflect")
    top_left = np.round(centers).astype(int) - half + crop  # in padded coordinates
    crops = np.stack([padded[y : y + crop, x : x + crop] for y, x in top_left])
    rows, cols = (centers[:, 0] // BLOCK).astype(int), (centers[:, 1] // BLOCK).astype(int)
    return NucleiTask(crops=crops, labels=labels, centers=centers, train=(rows + cols) % 2 == 0)


def colour_histogram(crops: np.ndarray, bins: int = 8) -> np.ndarray:
    """Per-channel colour histograms, ``bins`` per RGB channel, each normalised to sum 1: ``(n, 3 * bins)``."""
    crops = np.asarray(crops)
    idx = (crops.astype(np.int64) * bins) // 256  # (n, h, w, 3) bin of each value
    n = len(crops)
    out = np.zeros((n, 3, bins))
    for c in range(3):
        flat = idx[..., c].reshape(n, -1)
        out[:, c] = np.stack([np.bincount(row, minlength=bins) for row in flat])
    return (out / out.sum(-1, keepdims=True)).reshape(n, 3 * bins)


def evaluate_features(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    k: int = 20,
    temperature: float = 0.07,
    seeds: int = 3,
    shots: int = 10,
    episodes: int = 100,
    n_boot: int = 500,
    linear_C: float | None = None,
) -> dict[str, dict[str, MetricSummary]]:
    """kNN, linear and few-shot metrics of one feature set: ``{protocol: {metric: summary}}``.

    kNN is deterministic (one run, bootstrap interval over test nuclei); the linear
    probe is repeated over ``seeds`` validation splits (or fitted once with a fixed
    ``linear_C``, the protocol of the project's baselines with ``linear_C=1``);
    few-shot over ``episodes`` support draws (interval: spread over episodes).
    """
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    knn = knn_predict(train_x, train_y, test_x, k=k, temperature=temperature, num_classes=num_classes)
    if linear_C is None:
        linear = [linear_probe(train_x, train_y, test_x, seed=s).probs for s in range(seeds)]
    else:
        linear = [linear_probe(train_x, train_y, test_x, C=linear_C).probs]
    few = fewshot_episodes(train_x, train_y, test_x, shots=shots, episodes=episodes, seed=0)
    return {
        "knn": summarize(test_y, [knn], n_boot=n_boot),
        "linear" if linear_C is None else f"linear C={linear_C:g}": summarize(test_y, linear, n_boot=n_boot),
        f"{shots}-shot": summarize(test_y, few, interval="seeds"),
    }


def evaluate_features_shifted(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_sets: dict[str, np.ndarray],
    test_y: np.ndarray,
    **kwargs: Any,  # noqa: ANN401
) -> dict[str, dict[str, dict[str, MetricSummary]]]:
    """Metrics on several versions of the same test set (clean, stain-shifted): ``{name: {protocol: {metric: s}}}``.

    Every protocol is fitted once, on ``train_x`` (features of the original stain): the test
    sets are stacked and scored by the same kNN index, linear probes and few-shot episodes,
    so the columns differ only by the test images' stain. ``kwargs`` go to :func:`evaluate_features`.
    """
    names = list(test_sets)
    sizes = [len(test_sets[n]) for n in names]
    if any(n != len(test_y) for n in sizes):
        raise HistofmError(f"Every test set needs one row per test label ({len(test_y)}), got {sizes}.")
    stacked = np.concatenate([test_sets[n] for n in names])
    n_boot = kwargs.pop("n_boot", 500)
    seeds, shots = kwargs.pop("seeds", 3), kwargs.get("shots", 10)
    linear_C = kwargs.pop("linear_C", None)
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    knn = knn_predict(train_x, train_y, stacked, k=kwargs.pop("k", 20), temperature=kwargs.pop("temperature", 0.07),
                      num_classes=num_classes)
    if linear_C is None:
        linear = [linear_probe(train_x, train_y, stacked, seed=s).probs for s in range(seeds)]
    else:
        linear = [linear_probe(train_x, train_y, stacked, C=linear_C).probs]
    few = fewshot_episodes(train_x, train_y, stacked, shots=shots, episodes=kwargs.pop("episodes", 100), seed=0)
    out: dict[str, dict[str, dict[str, MetricSummary]]] = {}
    for i, name in enumerate(names):
        part = slice(i * len(test_y), (i + 1) * len(test_y))
        out[name] = {
            "knn": summarize(test_y, [knn[part]], n_boot=n_boot),
            "linear" if linear_C is None else f"linear C={linear_C:g}":
                summarize(test_y, [p[part] for p in linear], n_boot=n_boot),
            f"{shots}-shot": summarize(test_y, [p[part] for p in few], interval="seeds"),
        }
    return out


def shifted_test_crops(crops: np.ndarray, shifts: tuple[str, ...] | list[str]) -> dict[str, np.ndarray]:
    """``{"clean": crops, name: crops with the named stain shift}`` (see :data:`histofm.data.stain.STAIN_SHIFTS`)."""
    from histofm.data.stain import apply_stain_shift, stain_shift

    for name in shifts:
        stain_shift(name)  # fail on a bad name before any work
    return {"clean": crops, **{name: apply_stain_shift(crops, name) for name in shifts if name != "clean"}}


def encoder_features(
    model: torch.nn.Module,
    crops: np.ndarray,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    size: int | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
    description: str = "embedding",
) -> np.ndarray:
    """Embeddings of the crops (class token + mean patch token for ViTs), at ``size`` or the crop size."""
    from histofm.eval.embed import embed_images

    return embed_images(model, torch.from_numpy(crops), mean, std, size=size, device=device,
                        progress=progress, description=description)


@dataclass(frozen=True)
class NucleiRow:
    """One line of the results table."""

    features: str
    protocol: str
    metrics: dict[str, MetricSummary]
    dim: int
    shift: str = "clean"


def run_nuclei(
    model_name: str,
    checkpoint: str | os.PathLike[str] | None = None,
    crop: int = 48,
    resize: bool = False,
    device: str | torch.device = "cpu",
    seed: int = 0,
    seeds: int = 3,
    shots: int = 10,
    episodes: int = 100,
    n_boot: int = 500,
    linear_C: float | None = None,
    overrides: dict[str, Any] | None = None,
    progress: bool = False,
    stain_shifts: tuple[str, ...] | list[str] = (),
) -> list[NucleiRow]:
    """Colour histogram, ``model_name`` at random initialisation and, if given, with ``checkpoint``.

    Args:
        model_name: a registered encoder (``histofm.list_models()``).
        checkpoint: weights for the encoder (any layout ``histofm.create_model`` reads).
        crop: crop side in pixels.
        resize: resize crops to the encoder's input size instead of running it at the crop size.
        device: where the encoder runs.
        seed: seed of the random initialisation.
        seeds, shots, episodes, n_boot, linear_C: see :func:`evaluate_features`.
        overrides: constructor overrides for the encoder (``{"depth": 2}``).
        stain_shifts: names from :data:`histofm.data.stain.STAIN_SHIFTS`; the test crops are
            also scored with these shifts (features fitted on the original stain only).
    """
    from histofm.registry import create_model, model_info
    from histofm.utils import seed_everything

    task = load_nuclei_task(crop)
    tr, te = task.train, ~task.train
    tests = shifted_test_crops(task.crops[te], tuple(stain_shifts))
    info = model_info(model_name)
    size = info.input_size[-1] if resize else None

    def features(embed: Any, what: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:  # noqa: ANN401
        train = embed(task.crops[tr], what)
        return train, {name: embed(crops, f"{what} ({name})") for name, crops in tests.items()}

    def encoded(model: torch.nn.Module, what: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        return features(lambda c, d: encoder_features(model, c, info.mean, info.std, size, device, progress, d), what)

    feature_sets = [("colour histogram", features(lambda c, _: colour_histogram(c), "colour"))]
    seed_everything(seed)
    random_model = create_model(model_name, **(overrides or {}))
    feature_sets.append((f"{model_name} random init", encoded(random_model, "random init")))
    del random_model
    if checkpoint is not None:
        trained = create_model(model_name, checkpoint_path=checkpoint, **(overrides or {}))
        feature_sets.append((f"{model_name} checkpoint", encoded(trained, "checkpoint")))
    rows = []
    for name, (train_x, test_x) in feature_sets:
        for shift, x in {"train": train_x, **test_x}.items():
            if not np.isfinite(x).all():
                raise HistofmError(f"The {name} features ({shift}) contain NaN or inf; check the checkpoint and "
                                   "--device precision.")
        results = evaluate_features_shifted(train_x, task.labels[tr], test_x, task.labels[te], seeds=seeds,
                                            shots=shots, episodes=episodes, n_boot=n_boot, linear_C=linear_C)
        for shift, per_protocol in results.items():
            rows.extend(NucleiRow(name, protocol, metrics, train_x.shape[1], shift)
                        for protocol, metrics in per_protocol.items())
    return rows
