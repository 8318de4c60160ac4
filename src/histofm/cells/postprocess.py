"""From pixel maps to nucleus instances: HoVer-Net's post-processing and a classical baseline.

HoVer-Net (Graham et al. 2019, arXiv 1812.06499, Sec. III-C), given the nuclear
probability ``p``, the HV maps ``h, v`` and the mask ``M = [p >= 0.5]``::

    S_h = 1 - norm(d h / d x),   S_v = 1 - norm(d v / d y)     # norm: min-max to [0, 1]
    S   = max(S_h, S_v) * M                                   # high on boundaries between nuclei
    E   = -(1 - S) * M   (lightly smoothed)                   # energy: a basin per nucleus
    markers = label(open(M and not [S >= 0.4]))               # nucleus cores
    instances = watershed(E, markers, mask=M)

Foreground blobs left without a marker (small nuclei, whose gradient never falls below the
threshold) become nuclei of their own rather than disappearing.

Inside a nucleus ``h`` rises from -1 to 1 along x, so ``d h / d x`` is positive;
where two nuclei touch it drops from +1 to -1, the derivative is strongly
negative and ``S_h`` is close to 1. The derivatives are Sobel filters of side
``ksize`` (21 in HoVer-Net at 0.25 um/px; smaller suits 0.5 um/px).

The classical baseline needs no training: the haematoxylin channel of colour
deconvolution (:func:`histofm.data.stain.rgb_to_hed`), Otsu's threshold, and a
distance-transform watershed whose markers are the distance maxima.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from histofm.errors import HistofmError


@dataclass(frozen=True)
class PostprocessConfig:
    """Settings of :func:`hovernet_instances`.

    Attributes:
        threshold: nuclear-probability threshold of the foreground mask.
        marker_threshold: boundary-score threshold separating markers from boundaries.
        ksize: side of the Sobel filters on the HV maps (odd, >= 3).
        min_size: smallest object and marker kept, in pixels.
    """

    threshold: float = 0.5
    marker_threshold: float = 0.4
    ksize: int = 11
    min_size: int = 10


def _binomial(n: int) -> np.ndarray:
    row = np.array([1.0])
    for _ in range(n - 1):
        row = np.convolve(row, [1.0, 1.0])
    return row


def sobel(image: np.ndarray, axis: int, ksize: int = 5) -> np.ndarray:
    """Large Sobel derivative of ``image`` along ``axis`` (0: y, 1: x): binomial smoothing across, derivative along."""
    if ksize < 3 or ksize % 2 == 0:
        raise HistofmError(f"ksize must be odd and >= 3, got {ksize}; set e.g. ksize=21.")
    deriv = np.convolve(_binomial(ksize - 2), [-1.0, 0.0, 1.0])  # negative before, positive after
    smooth = _binomial(ksize)
    out = ndimage.correlate1d(image.astype(np.float64), deriv, axis=axis, mode="reflect")
    return ndimage.correlate1d(out, smooth, axis=1 - axis, mode="reflect")


def _minmax(x: np.ndarray) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


def remove_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Labels with objects under ``min_size`` pixels set to 0 (labels unchanged otherwise)."""
    if min_size <= 1 or labels.max() == 0:
        return labels
    sizes = np.bincount(labels.ravel())
    small = sizes < min_size
    small[0] = False
    out = labels.copy()
    out[small[labels]] = 0
    return out


def relabel(labels: np.ndarray) -> np.ndarray:
    """Consecutive labels 1..n in order of first appearance in sorted label value (0 stays 0), int32."""
    ids, inv = np.unique(labels, return_inverse=True)
    if ids[0] != 0:
        inv = inv + 1
    return inv.reshape(labels.shape).astype(np.int32)


def hovernet_instances(np_prob: np.ndarray, hv: np.ndarray, cfg: PostprocessConfig | None = None) -> np.ndarray:
    """Instance mask ``(H, W)`` int32 (0 background) from the nuclear probability ``(H, W)`` and HV maps ``(2, H, W)``."""
    from skimage.morphology import disk
    from skimage.segmentation import watershed

    cfg = cfg or PostprocessConfig()
    fg = np_prob >= cfg.threshold
    fg = remove_small(ndimage.label(fg)[0], cfg.min_size) > 0
    if not fg.any():
        return np.zeros(np_prob.shape, np.int32)
    s_h = 1 - _minmax(sobel(_minmax(hv[0]), axis=1, ksize=cfg.ksize))
    s_v = 1 - _minmax(sobel(_minmax(hv[1]), axis=0, ksize=cfg.ksize))
    score = np.maximum(s_h, s_v) * fg  # (H, W) boundary score inside the mask
    energy = -ndimage.gaussian_filter((1 - score) * fg, sigma=0.8)
    cores = fg & (score < cfg.marker_threshold)
    cores = ndimage.binary_fill_holes(cores)
    cores = ndimage.binary_opening(cores, structure=disk(2))
    markers = remove_small(ndimage.label(cores)[0], cfg.min_size)
    inst = watershed(energy, markers, mask=fg)
    # A foreground blob that got no marker (a small nucleus whose HV gradient never drops under the
    # threshold) would vanish; it becomes one nucleus instead.
    orphans, n = ndimage.label(fg & (inst == 0))
    if n:
        inst = np.where(orphans > 0, orphans + inst.max(), inst)
        inst = remove_small(inst, cfg.min_size)
    return relabel(inst)


def instance_types(inst: np.ndarray, tp_prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-instance type (1..T) and its probability from type probabilities ``(T+1, H, W)``.

    The type of nucleus ``k`` maximises the mean probability of classes ``1..T`` over its
    pixels; the probability is that mean renormalised over the nucleus classes (background
    excluded). Returns two arrays ``(n,)`` for labels ``1..n``.
    """
    n = int(inst.max())
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float64)
    flat = inst.ravel()
    counts = np.maximum(np.bincount(flat, minlength=n + 1)[1:], 1)
    means = np.stack([np.bincount(flat, weights=tp_prob[c].ravel(), minlength=n + 1)[1:] for c in range(1, len(tp_prob))], 1)
    means = means / counts[:, None]  # (n, T)
    means = means / np.maximum(means.sum(1, keepdims=True), 1e-12)
    return means.argmax(1) + 1, means.max(1)


def classical_instances(
    rgb: np.ndarray, min_size: int = 10, min_distance: int = 4, sigma: float = 1.0, threshold: float | None = None
) -> np.ndarray:
    """Haematoxylin channel + Otsu + distance-transform watershed: instance mask ``(H, W)`` int32.

    Args:
        rgb: ``(H, W, 3)`` uint8 image.
        min_size: smallest nucleus kept, in pixels.
        min_distance: smallest distance between two markers (distance-map maxima).
        sigma: Gaussian smoothing of the haematoxylin channel.
        threshold: haematoxylin threshold; ``None`` takes Otsu's.
    """
    import torch
    from skimage.feature import peak_local_max
    from skimage.filters import threshold_otsu
    from skimage.segmentation import watershed

    from histofm.data.stain import rgb_to_hed

    x = torch.from_numpy(np.array(rgb, dtype=np.float64)).permute(2, 0, 1) / 255.0
    h = ndimage.gaussian_filter(rgb_to_hed(x)[0].numpy(), sigma)  # (H, W) haematoxylin concentration
    fg = h > (threshold_otsu(h) if threshold is None else threshold)
    fg = ndimage.binary_fill_holes(ndimage.binary_opening(fg, iterations=1))
    fg = remove_small(ndimage.label(fg)[0], min_size) > 0
    dist = ndimage.distance_transform_edt(fg)
    peaks = peak_local_max(dist, min_distance=min_distance, labels=ndimage.label(fg)[0], exclude_border=False)
    markers = np.zeros(fg.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    inst = watershed(-dist, markers, mask=fg)
    return relabel(remove_small(inst, min_size))
