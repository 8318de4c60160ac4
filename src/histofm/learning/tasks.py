"""Small real semi-supervised tasks built from the bundled H&E samples.

``nucleus_type_task``: the 1,294 labelled nuclei of the HGSC tumour-nest field
(``hgsc_nest`` with its type and instance masks): a square crop centred on each
nucleus' centre of mass, classes connective / inflammatory / neoplastic. Train
and test are split by region, never at random (neighbouring nuclei look alike):
the field is cut into a 3 x 3 grid of 500 px blocks and the blocks with even
row + column are for training (686 nuclei), the others for testing (608), the
same split as ``BASELINES.md``. A stratified fraction of the training nuclei keep
their labels; the rest of the training nuclei are the unlabelled pool.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

from histofm.data import sample_path
from histofm.errors import HistofmError
from histofm.learning.semi import SemiData

NUCLEUS_CLASSES = ("connective", "inflammatory", "neoplastic")


@dataclass
class SemiTask:
    """A semi-supervised problem with a held-out labelled test set."""

    data: SemiData
    x_test: torch.Tensor  # (N, 3, H, W) uint8
    y_test: torch.Tensor  # (N,)


def _stratified_subset(y: np.ndarray, frac: float, rng: np.random.Generator) -> np.ndarray:
    keep = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        n = max(1, int(round(frac * len(idx))))
        keep.append(rng.choice(idx, size=n, replace=False))
    return np.sort(np.concatenate(keep))


def nucleus_crops(crop: int = 48, size: int = 32) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """All labelled nuclei of ``hgsc_nest``: ``(images uint8 (N,3,size,size), labels (N,), centres (N,2) y,x)``."""
    img = np.asarray(Image.open(sample_path("hgsc_nest")).convert("RGB"))
    types = np.load(sample_path("hgsc_nest_type_mask"))["nuc_raster"]
    inst = np.load(sample_path("hgsc_nest_inst_mask"))["nuc_raster"]
    ids = np.unique(inst)
    ids = ids[ids > 0]
    centres = np.asarray(ndimage.center_of_mass(np.ones_like(inst), inst, ids))  # (N, 2) y, x
    objects = ndimage.find_objects(inst)  # indexed by id - 1
    labels = np.zeros(len(ids), dtype=np.int64)
    for k, i in enumerate(ids):
        t = types[objects[i - 1]][inst[objects[i - 1]] == i]
        t = t[t > 0]
        labels[k] = np.bincount(t).argmax() if len(t) else 0  # majority type of the nucleus' pixels
    keep = labels > 0
    centres, labels = centres[keep], labels[keep] - 1  # 0 connective, 1 inflammatory, 2 neoplastic
    half = crop // 2
    padded = np.pad(img, ((half, half), (half, half), (0, 0)), mode="reflect")
    yx = np.round(centres).astype(int)
    crops = np.stack([padded[y : y + crop, x : x + crop] for y, x in yx])  # (N, crop, crop, 3)
    x = torch.from_numpy(crops).permute(0, 3, 1, 2).float()
    if size != crop:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8), torch.from_numpy(labels).long(), centres


def nucleus_type_task(label_frac: float = 0.1, crop: int = 48, size: int = 32, seed: int = 0) -> SemiTask:
    """The nucleus-type task with ``label_frac`` of the training nuclei labelled (stratified by class)."""
    if not 0 < label_frac <= 1:
        raise HistofmError(f"label_frac must be in (0, 1], got {label_frac}.")
    x, y, centres = nucleus_crops(crop, size)
    block = (centres // 500).astype(int).clip(0, 2)
    train = (block.sum(1) % 2) == 0
    tr, te = np.flatnonzero(train), np.flatnonzero(~train)
    lab = tr[_stratified_subset(y.numpy()[tr], label_frac, np.random.default_rng(seed))]
    unl = np.setdiff1d(tr, lab)
    data = SemiData(x_l=x[lab], y_l=y[lab], x_u=x[unl], y_u=y[unl], classes=NUCLEUS_CLASSES)
    return SemiTask(data=data, x_test=x[te], y_test=y[te])


SYNTHETIC_CLASSES = ("lymphocyte", "tumour", "spindle")


def render_synthetic_nuclei(
    labels: torch.Tensor, size: int = 24, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Render H&E-like tiles, one nucleus class per tile, as ``uint8`` ``(N, 3, size, size)``.

    Each tile holds a central nucleus whose shape depends on the class (0: small,
    dark, round; 1: large, pale, round with a nucleolus; 2: thin and elongated),
    0-3 smaller distractor nuclei of random shape, a stroma texture, and a
    per-tile random stain (haematoxylin and eosin colours, stain amounts,
    brightness) plus rotation, off-centring and noise. The class signal is the
    central nucleus' size, shape and texture; colour carries none of it.
    """
    g = generator or torch.Generator().manual_seed(0)
    n = len(labels)
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    s = size / 24.0  # shapes are specified for 24 px tiles

    def u(lo: float | torch.Tensor, hi: float | torch.Tensor, shape: tuple[int, ...] = (n,)) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(shape, generator=g)

    def ellipse(cy: torch.Tensor, cx: torch.Tensor, a: torch.Tensor, b: torch.Tensor, th: torch.Tensor) -> torch.Tensor:
        dy, dx = yy[None] - cy[:, None, None], xx[None] - cx[:, None, None]
        c, si = torch.cos(th)[:, None, None], torch.sin(th)[:, None, None]
        r2 = ((dx * c + dy * si) / a[:, None, None]) ** 2 + ((-dx * si + dy * c) / b[:, None, None]) ** 2
        return torch.sigmoid((1 - r2.sqrt()) * 4 * a[:, None, None].clamp_min(1))  # soft edge, (N, H, W)

    lab = labels.long()
    # Central nucleus: semi-axes, darkness and texture by class (size ranges of classes 1 and 2 overlap).
    a_lo = torch.tensor([2.5, 4.5, 5.0])[lab] * s
    a_hi = torch.tensor([3.5, 6.0, 7.5])[lab] * s
    a = u(a_lo, a_hi)
    aspect = torch.where(lab == 2, u(0.25, 0.45), u(0.8, 1.0))
    b = a * aspect
    dark = torch.tensor([1.1, 0.6, 0.85])[lab] * u(0.8, 1.2)
    centre = size / 2 - 0.5
    cy, cx = centre + u(-2.5, 2.5) * s, centre + u(-2.5, 2.5) * s
    th = u(0, torch.pi)
    nuc = ellipse(cy, cx, a, b, th)
    chromatin = 1 + 0.2 * torch.randn((n, size, size), generator=g)
    hema = nuc * dark[:, None, None] * chromatin
    # Tumour nuclei: a dark nucleolus.
    nucleolus = ellipse(cy + u(-1, 1), cx + u(-1, 1), torch.full((n,), 1.0 * s), torch.full((n,), 1.0 * s), th)
    hema = hema + (lab == 1).float()[:, None, None] * nucleolus * 0.8
    # Distractors: 0-3 random nuclei away from the centre.
    for _ in range(3):
        present = (torch.rand(n, generator=g) < 0.6).float()
        ang = u(0, 2 * torch.pi)
        rad = u(7.5, 11.0) * s
        da = u(1.5, 4.0) * s
        blob = ellipse(centre + rad * torch.sin(ang), centre + rad * torch.cos(ang), da, da * u(0.4, 1.0),
                       u(0, torch.pi))
        hema = hema + present[:, None, None] * blob * u(0.5, 1.1)[:, None, None]
    # Stroma: low-frequency eosin texture.
    noise = torch.randn((n, 1, size // 4 + 1, size // 4 + 1), generator=g)
    eos = 0.35 + 0.12 * F.interpolate(noise, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    eos = eos * u(0.5, 1.5)[:, None, None] * (1 - 0.6 * nuc)
    hema = hema * u(0.6, 1.4)[:, None, None]
    # Per-tile stain vectors around Ruifrok-Johnston's haematoxylin and eosin.
    h_vec = torch.tensor([0.65, 0.70, 0.29]) + 0.06 * torch.randn((n, 3), generator=g)
    e_vec = torch.tensor([0.07, 0.99, 0.11]) + 0.06 * torch.randn((n, 3), generator=g)
    h_vec, e_vec = F.normalize(h_vec.abs(), dim=1), F.normalize(e_vec.abs(), dim=1)
    od = hema[:, None] * h_vec[:, :, None, None] + eos[:, None] * e_vec[:, :, None, None]  # (N, 3, H, W)
    rgb = torch.exp(-od) * u(0.85, 1.05)[:, None, None, None]
    rgb = rgb + 0.03 * torch.randn(rgb.shape, generator=g)
    return (rgb.clamp(0, 1) * 255).round().to(torch.uint8)


def synthetic_nuclei_task(
    n_train: int = 600, n_test: int = 600, label_frac: float = 0.1, size: int = 24, seed: int = 0
) -> SemiTask:
    """A generated 3-class nucleus-morphology task (see :func:`render_synthetic_nuclei`).

    ``n_train`` tiles form the training pool, of which a stratified ``label_frac``
    keep their labels; ``n_test`` independent tiles are the test set.
    """
    if not 0 < label_frac < 1:
        raise HistofmError(f"label_frac must be in (0, 1), got {label_frac}.")
    g = torch.Generator().manual_seed(seed)
    k = len(SYNTHETIC_CLASSES)
    y_tr = torch.arange(n_train) % k
    y_te = torch.arange(n_test) % k
    x_tr = render_synthetic_nuclei(y_tr, size, g)
    x_te = render_synthetic_nuclei(y_te, size, g)
    lab = torch.from_numpy(_stratified_subset(y_tr.numpy(), label_frac, np.random.default_rng(seed)))
    unl = torch.from_numpy(np.setdiff1d(np.arange(n_train), lab.numpy()))
    data = SemiData(x_l=x_tr[lab], y_l=y_tr[lab], x_u=x_tr[unl], y_u=y_tr[unl], classes=SYNTHETIC_CLASSES)
    return SemiTask(data=data, x_test=x_te, y_test=y_te)
