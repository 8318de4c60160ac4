"""Multi-crop views for self-distillation: 2 global + N local crops, and Virchow2's ECT crops.

Multi-crop (Caron et al. 2020, SwAV, arXiv 2006.09882; used by DINO, arXiv
2104.14294, and DINOv2, arXiv 2304.07193): from one image draw two large
"global" crops and several small "local" crops. The teacher sees only the
global crops, the student sees all of them, so the student learns to predict
the global view from a small part of it ("local-to-global" correspondence).
Crops are random-resized crops: a random area fraction in ``scale`` of the
image (DINOv2: 0.32-1 for global 224 px crops, 0.05-0.32 for local 98 px crops)
rescaled to the output size.

Extended-context translation (ECT), Zimmermann et al. 2024, "Virchow2",
arXiv 2408.00738: random-resized crops change the apparent magnification,
which in pathology changes the meaning of the image (a nucleus at 20x is not a
nucleus at 80x). Virchow2 instead reads a larger source region (392 px) and
TRANSLATES crops of nearly native scale inside it: the crop side is
``out * sqrt(s)`` with ``s`` in (0.9, 1.1) and the aspect ratio in (0.95, 1.05),
so global (224 px) and local (98 px) crops keep the magnification and differ by
position. Vertical flips are added (tissue has no up or down). The ECT sizes are
stated by secondary sources [U] and are scaled proportionally for small runs.

Photometric augmentation follows DINO: colour jitter (0.4, 0.4, 0.2, 0.1) with
probability 0.8, grayscale 0.2, Gaussian blur (always on the first global crop,
0.1 on the second, 0.5 on local crops) and solarisation (0.2, second global crop
only). Blur sigmas scale with the crop size so small runs are not washed out.
Optionally a HED stain jitter (Tellez et al. 2018, arXiv 1808.05896;
:class:`histofm.data.stain.HEDJitter`) perturbs the haematoxylin/eosin/DAB
channels, and 90-degree rotations (:class:`histofm.data.augment.RandomRotate90`)
use the absent orientation of tissue.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from PIL import Image

from histofm.constants import IMAGENET_MEAN, IMAGENET_STD
from histofm.data.augment import RandomRotate90
from histofm.data.stain import HEDJitter
from histofm.errors import HistofmError
from histofm.settings import check_config, setting


@dataclass(frozen=True)
class MultiCropConfig:
    """Sizes, crop mode and augmentation strengths of :class:`MultiCropTransform`.

    Attributes:
        global_size, local_size: output sides of global and local crops.
        n_global, n_local: number of crops of each kind (global crops come first).
        crop: ``"rrc"`` (random-resized crop) or ``"ect"`` (Virchow2's translation crops).
        global_scale, local_scale: RRC area fractions of the image.
        ect_region: ECT source-region side; the input is resized (shorter side) and
            randomly cropped to ``ect_region`` first.
        ect_scale, ect_ratio: ECT area-scale and aspect jitter of a crop relative to its output.
        hflip, vflip: random horizontal / vertical flips (probability 0.5 each).
        rot90: random multiples of 90 degrees.
        jitter_p: probability of colour jitter with strengths ``jitter``
            (brightness, contrast, saturation, hue).
        grayscale_p: probability of converting to grayscale.
        blur_p: blur probabilities (first global, second global, local crops).
        blur_sigma: Gaussian blur sigma range at 224 px, scaled with the crop size.
        solarize_p: solarisation probability of the second global crop.
        hed_p, hed_sigma, hed_bias: probability and strengths of HED stain jitter.
        mean, std: normalisation.
    """

    global_size: int = setting(224, range=">= 1")
    local_size: int = setting(98, range=">= 1", allow_zero=True)
    n_global: int = setting(2, range=">= 1")
    n_local: int = setting(8, range=">= 0")
    crop: Literal["rrc", "ect"] = "rrc"
    global_scale: tuple[float, float] = setting((0.32, 1.0), range="(0, 1]", ordered=True)
    local_scale: tuple[float, float] = setting((0.05, 0.32), range="(0, 1]", ordered=True)
    ect_region: int = setting(392, range=">= 1")
    ect_scale: tuple[float, float] = setting((0.9, 1.1), range="> 0", ordered=True)
    ect_ratio: tuple[float, float] = setting((0.95, 1.05), range="> 0", ordered=True)
    hflip: bool = True
    vflip: bool = False
    rot90: bool = False
    jitter_p: float = setting(0.8, range="[0, 1]")
    jitter: tuple[float, float, float, float] = setting((0.4, 0.4, 0.2, 0.1), range=">= 0")
    grayscale_p: float = setting(0.2, range="[0, 1]")
    blur_p: tuple[float, float, float] = setting((1.0, 0.1, 0.5), range="[0, 1]")
    blur_sigma: tuple[float, float] = setting((0.1, 2.0), range="> 0", ordered=True)
    solarize_p: float = setting(0.2, range="[0, 1]")
    hed_p: float = setting(0.0, range="[0, 1]")
    hed_sigma: float = setting(0.05, range=">= 0")
    hed_bias: float = setting(0.01, range=">= 0")
    mean: tuple[float, float, float] = setting(IMAGENET_MEAN, range="[0, 1]")
    std: tuple[float, float, float] = setting(IMAGENET_STD, range="> 0")

    def __post_init__(self) -> None:
        check_config(self)  # types, choices and ranges declared above
        if self.n_local and self.local_size < 1:
            raise HistofmError(f"Crop sizes must be positive, got {self.global_size} and {self.local_size}.")


def scaled_multicrop_sizes(img_size: int, patch_size: int) -> dict[str, int]:
    """DINOv2 / Virchow2 crop sizes (224 / 98, ECT region 392) scaled to ``img_size`` global crops.

    Local crops are rounded to a multiple of the patch size and keep at least 3 x 3
    patches (a 2 x 2 crop of a tiny run carries almost nothing to match).
    """
    k = img_size / 224.0
    local = max(min(3 * patch_size, img_size), int(round(98 * k / patch_size)) * patch_size)
    return {"global_size": img_size, "local_size": local, "ect_region": max(img_size, int(round(392 * k)))}


def ect_crop_box(
    region: int, out_size: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int, int, int]:
    """A random ``(top, left, height, width)`` of about ``out_size`` px inside a ``region`` square.

    The area is ``out_size**2 * s`` with ``s ~ U(scale)``, the aspect ratio ``r`` is
    log-uniform in ``ratio``; the box is clipped to the region and placed uniformly.
    """
    s = float(torch.empty(1).uniform_(*scale))
    r = math.exp(float(torch.empty(1).uniform_(math.log(ratio[0]), math.log(ratio[1]))))
    w = min(region, max(1, int(round(out_size * math.sqrt(s * r)))))
    h = min(region, max(1, int(round(out_size * math.sqrt(s / r)))))
    top = int(torch.randint(0, region - h + 1, (1,)))
    left = int(torch.randint(0, region - w + 1, (1,)))
    return top, left, h, w


class MultiCropTransform:
    """One RGB image -> a list of normalised crops ``[global_1, ..., local_1, ...]`` (``(3, S, S)`` each).

    Batched by ``default_collate`` this gives a list of ``(B, 3, S, S)`` tensors, the
    batch format of :mod:`histofm.methods.dino`, ``ibot`` and ``dinov2``.
    """

    def __init__(self, cfg: MultiCropConfig | None = None) -> None:
        self.cfg = cfg = cfg or MultiCropConfig()
        geometric: list[Callable] = []
        if cfg.hflip:
            geometric.append(T.RandomHorizontalFlip())
        if cfg.vflip:
            geometric.append(T.RandomVerticalFlip())
        if cfg.rot90:
            geometric.append(RandomRotate90())
        jitter: list[Callable] = []
        if cfg.jitter_p > 0:
            jitter.append(T.RandomApply([T.ColorJitter(*cfg.jitter)], p=cfg.jitter_p))
        if cfg.grayscale_p > 0:
            jitter.append(T.RandomGrayscale(p=cfg.grayscale_p))
        to_float = [T.ToImage(), T.ToDtype(torch.float32, scale=True)]
        if cfg.hed_p > 0:  # HED jitter works on float tensors, before the colour jitter
            colour = [*to_float, HEDJitter(cfg.hed_sigma, cfg.hed_bias, p=cfg.hed_p), *jitter]
        else:  # colour jitter on small PIL images is about twice as fast as on tensors
            colour = [*jitter, *to_float]

        def pipeline(size: int, blur_p: float, solarize_p: float) -> T.Compose:
            steps = [*geometric, *colour]
            if blur_p > 0:
                k = size / 224.0
                sigma = (cfg.blur_sigma[0] * k, cfg.blur_sigma[1] * k)
                kernel = max(3, int(4 * sigma[1]) // 2 * 2 + 1)  # odd, covers +-2 sigma
                steps.append(T.RandomApply([T.GaussianBlur(kernel, sigma=sigma)], p=blur_p))
            if solarize_p > 0:
                steps.append(T.RandomSolarize(threshold=0.5, p=solarize_p))
            return T.Compose([*steps, T.Normalize(cfg.mean, cfg.std)])

        g1, g2, loc = cfg.blur_p
        self.global_views = [pipeline(cfg.global_size, g1 if i == 0 else g2, 0.0 if i == 0 else cfg.solarize_p)
                             for i in range(cfg.n_global)]
        self.local_view = pipeline(cfg.local_size, loc, 0.0)
        interp = T.InterpolationMode.BICUBIC
        if cfg.crop == "rrc":
            self.global_crop = T.RandomResizedCrop(cfg.global_size, scale=cfg.global_scale, interpolation=interp)
            self.local_crop = T.RandomResizedCrop(cfg.local_size, scale=cfg.local_scale, interpolation=interp)

    def _ect(self, region: Image.Image, out_size: int) -> Image.Image:
        top, left, h, w = ect_crop_box(region.size[0], out_size, self.cfg.ect_scale, self.cfg.ect_ratio)
        return TF.resized_crop(region, top, left, h, w, [out_size, out_size], interpolation=T.InterpolationMode.BICUBIC)

    def _region(self, img: Image.Image) -> Image.Image:
        """The ECT source region: shorter side resized to ``ect_region``, then a random square."""
        side = self.cfg.ect_region
        if min(img.size) != side:
            img = TF.resize(img, side, interpolation=T.InterpolationMode.BICUBIC)
        return T.RandomCrop(side)(img)

    def __call__(self, img: Image.Image) -> list[torch.Tensor]:
        if not isinstance(img, Image.Image):
            raise HistofmError(f"MultiCropTransform expects a PIL image, got {type(img).__name__}.")
        img = img.convert("RGB")
        cfg = self.cfg
        if cfg.crop == "ect":
            region = self._region(img)
            globals_ = [self._ect(region, cfg.global_size) for _ in range(cfg.n_global)]
            locals_ = [self._ect(region, cfg.local_size) for _ in range(cfg.n_local)]
        else:
            globals_ = [self.global_crop(img) for _ in range(cfg.n_global)]
            locals_ = [self.local_crop(img) for _ in range(cfg.n_local)]
        crops = [view(c) for view, c in zip(self.global_views, globals_)]
        crops += [self.local_view(c) for c in locals_]
        return crops
