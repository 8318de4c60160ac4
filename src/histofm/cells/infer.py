"""Tiled prediction and stitching: nucleus instances of a whole image or slide.

Two levels of tiling keep memory bounded and borders clean:

1. **Tiles** (``tile`` px, overlapping by ``overlap``) go through the network; their maps are
   blended with a weight that falls towards the tile edge (a pixel near an edge saw
   little context), so the NP, HV and TP maps of a *chunk* have no seams.
2. **Chunks** (``chunk`` px of level 0, plus a ``margin`` of context on every side) are
   post-processed one at a time; a nucleus belongs to the chunk holding its centroid,
   so a nucleus cut by a chunk border is still found whole by exactly one chunk.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from histofm.cells.hovernet import HoVerNetViT
from histofm.cells.postprocess import PostprocessConfig, hovernet_instances, instance_types, relabel
from histofm.errors import HistofmError


def _edge_weight(tile: int, overlap: int) -> np.ndarray:
    """``(tile, tile)`` blending weight: 1 in the middle, ramping down over ``overlap`` px to a small floor."""
    ramp = np.ones(tile)
    if overlap > 0:
        r = (np.arange(overlap) + 0.5) / overlap
        ramp[:overlap], ramp[tile - overlap :] = r, r[::-1]
    return np.maximum(np.outer(ramp, ramp), 1e-3)


def _starts(length: int, tile: int, stride: int) -> list[int]:
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


@torch.no_grad()
def predict_maps(
    model: HoVerNetViT,
    rgb: np.ndarray,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    tile: int = 128,
    overlap: int = 32,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
) -> dict[str, np.ndarray]:
    """Blended maps of an RGB array ``(H, W, 3)`` uint8: ``np`` prob ``(H, W)``, ``hv`` ``(2, H, W)``, ``tp`` prob ``(T+1, H, W)``."""
    p = model.patch_size
    if tile % p or tile <= 2 * overlap or overlap < 0:
        raise HistofmError(f"The tile ({tile} px) must be a multiple of the patch size {p} and larger than twice the "
                           f"overlap ({overlap} px); change --tile or --overlap.")
    H, W = rgb.shape[:2]
    ph, pw = max(H, tile), max(W, tile)  # small inputs are padded up to one tile
    img = np.pad(rgb, ((0, ph - H), (0, pw - W), (0, 0)), mode="reflect") if (ph, pw) != (H, W) else rgb
    weight = _edge_weight(tile, overlap)
    out = {"np": np.zeros((1, ph, pw)), "hv": np.zeros((2, ph, pw)), "tp": np.zeros((model.num_types + 1, ph, pw))}
    wsum = np.zeros((ph, pw))
    coords = [(y, x) for y in _starts(ph, tile, tile - overlap) for x in _starts(pw, tile, tile - overlap)]
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device).view(1, 3, 1, 1)
    model.to(device).eval()
    for i in range(0, len(coords), batch_size):
        part = coords[i : i + batch_size]
        x = torch.from_numpy(np.stack([img[y : y + tile, x : x + tile] for y, x in part])).to(device)
        x = (x.permute(0, 3, 1, 2).float() / 255 - m) / s  # (b, 3, tile, tile)
        o = model(x)
        maps = {"np": o["np"].softmax(1)[:, 1:], "hv": o["hv"], "tp": o["tp"].softmax(1)}
        maps = {k: v.float().cpu().numpy() for k, v in maps.items()}
        for j, (y, x0) in enumerate(part):
            for k in out:
                out[k][:, y : y + tile, x0 : x0 + tile] += maps[k][j] * weight
            wsum[y : y + tile, x0 : x0 + tile] += weight
    res = {k: (v / wsum)[:, :H, :W].astype(np.float32) for k, v in out.items()}
    res["np"] = res["np"][0]
    return res


@dataclass
class Nuclei:
    """Instances of one image or slide: the mask and one row per nucleus (label ``i + 1`` is row ``i``).

    Attributes:
        mask: ``(H, W)`` int32 instance labels, level-0 pixels (0 background).
        centroid: ``(n, 2)`` ``(x, y)`` in level-0 pixels.
        area: ``(n,)`` pixels.
        type_id: ``(n,)`` in ``1..T``.
        probability: ``(n,)`` mean type probability over the nucleus.
    """

    mask: np.ndarray
    centroid: np.ndarray
    area: np.ndarray
    type_id: np.ndarray
    probability: np.ndarray


def segment_array(
    model: HoVerNetViT, rgb: np.ndarray, mean: tuple[float, float, float], std: tuple[float, float, float],
    tile: int = 128, overlap: int = 32, post: PostprocessConfig | None = None, device: str | torch.device = "cpu",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Instances of one RGB array: ``(mask (H, W) int32, type_id (n,), probability (n,))``."""
    maps = predict_maps(model, rgb, mean, std, tile, overlap, device=device)
    inst = hovernet_instances(maps["np"], maps["hv"], post)
    types, probs = instance_types(inst, maps["tp"])
    return inst, types, probs


def segment_region(
    read: Callable[[int, int, int, int], np.ndarray],
    size: tuple[int, int],
    model: HoVerNetViT,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    tile: int = 128,
    overlap: int = 32,
    chunk: int = 1024,
    margin: int = 64,
    post: PostprocessConfig | None = None,
    device: str | torch.device = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> Nuclei:
    """Segment a ``size = (W, H)`` level-0 region chunk by chunk; ``read(x, y, w, h)`` returns ``(h, w, 3)`` uint8.

    ``progress(done, total)`` is called after each chunk.
    """
    W, H = size
    if chunk < tile or margin < 0:
        raise HistofmError(f"--chunk ({chunk}) must be at least the tile ({tile}) and --margin ({margin}) non-negative.")
    mask = np.zeros((H, W), np.int32)
    types_all: list[np.ndarray] = []
    probs_all: list[np.ndarray] = []
    next_id = 1
    chunks = [(x, y) for y in range(0, H, chunk) for x in range(0, W, chunk)]
    for n, (cx, cy) in enumerate(chunks):
        cw, ch = min(chunk, W - cx), min(chunk, H - cy)
        rx, ry = cx - margin, cy - margin
        rgb = read(rx, ry, cw + 2 * margin, ch + 2 * margin)  # (ch + 2m, cw + 2m, 3), white outside
        inst, types, probs = segment_array(model, rgb, mean, std, tile, overlap, post, device)
        if inst.max() > 0:
            from scipy import ndimage

            ids = np.arange(1, inst.max() + 1)
            cen = np.array(ndimage.center_of_mass(np.ones_like(inst), inst, ids)).reshape(-1, 2)  # (n, 2) (y, x)
            own = (cen[:, 0] >= margin) & (cen[:, 0] < margin + ch) & (cen[:, 1] >= margin) & (cen[:, 1] < margin + cw)
            keep_ids = ids[own]
            local = np.zeros(inst.max() + 1, np.int32)
            local[keep_ids] = np.arange(next_id, next_id + len(keep_ids))
            relab = local[inst]  # (h, w) global ids of owned nuclei
            # Paste into the level-0 mask, clipped to the region, never over a nucleus already placed.
            y0, x0 = max(ry, 0), max(rx, 0)
            y1, x1 = min(ry + rgb.shape[0], H), min(rx + rgb.shape[1], W)
            src = relab[y0 - ry : y1 - ry, x0 - rx : x1 - rx]
            dst = mask[y0:y1, x0:x1]
            free = (dst == 0) & (src > 0)
            dst[free] = src[free]
            types_all.append(types[keep_ids - 1])
            probs_all.append(probs[keep_ids - 1])
            next_id += len(keep_ids)
        if progress is not None:
            progress(n + 1, len(chunks))
    type_id = np.concatenate(types_all) if types_all else np.zeros(0, np.int64)
    prob = np.concatenate(probs_all) if probs_all else np.zeros(0)
    return _finish(mask, type_id, prob)


def _finish(mask: np.ndarray, type_id: np.ndarray, prob: np.ndarray) -> Nuclei:
    """Drop nuclei that lost every pixel to a neighbour, relabel 1..n and measure them."""
    from scipy import ndimage

    n = len(type_id)
    area = np.bincount(mask.ravel(), minlength=n + 1)[1:]
    alive = area > 0
    new = relabel(mask)
    ids = np.arange(1, int(new.max()) + 1)
    cen = np.array(ndimage.center_of_mass(np.ones_like(new), new, ids)).reshape(-1, 2)[:, ::-1]  # (n, 2) (x, y)
    return Nuclei(new, cen, area[alive], type_id[alive], prob[alive])
