"""Masked image modelling with mask tokens in the encoder: SimMIM and a BEiT-style variant.

Unlike MAE (:mod:`histofm.methods.mae`), both methods here feed the WHOLE
patch grid to the ViT, with the embeddings of masked patches replaced by one
learned ``mask_token`` (``backbone.forward_features(x, masks)``), and predict
something about each masked patch from its output token with a single linear
layer.

SimMIM (Xie et al. 2021, "SimMIM: A Simple Framework for Masked Image
Modeling", arXiv 2111.09886): random masking of large square units (32 x 32
pixels, 60 %), a linear head that regresses the raw (normalised) pixels of the
patch, and an L1 loss on the masked pixels only::

    L = (1 / (|M| p^2 C)) sum_{i in M} || y_i - x_i ||_1          # M: masked patches

BEiT (Bao et al. 2021, "BEiT: BERT Pre-Training of Image Transformers",
arXiv 2106.08254): block-wise masking (about 40 % of the patches in
rectangles, Algorithm 1, :func:`histofm.methods.masking.block_mask`) and a
softmax classifier over a vocabulary of "visual tokens", trained with the
cross-entropy of the masked positions::

    L = - (1 / |M|) sum_{i in M} log softmax(W h_i)[z_i]         # z_i: token of the unmasked patch i

BEiT's tokens come from DALL-E's discrete VAE. histofm downloads nothing, so
the BEiT-style variant here uses a tokenizer fitted in the package: k-means over
pooled patch pixels (:class:`histofm.methods.tokenizer.KMeansTokenizer`; see
that module for why k-means rather than a VQ autoencoder). It is fitted on the
first training batch unless :meth:`MIM.fit_tokenizer` was called on more
images before training, and then frozen.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from histofm.errors import HistofmError
from histofm.methods.base import SSLMethod
from histofm.methods.masking import block_mask
from histofm.methods.patches import patchify, unpatchify
from histofm.methods.pictures import ReconstructionPictures, picture_set
from histofm.methods.presets import apply_preset
from histofm.methods.tokenizer import KMeansTokenizer
from histofm.methods.views import images_of, make_backbone, pretrain_transform
from histofm.settings import check_config, setting, split_backbone_overrides


@dataclass(frozen=True)
class MIMConfig:
    """Masked-image-modelling settings (defaults: SimMIM's ViT-B recipe; see :data:`BEIT` for BEiT's).

    Attributes:
        target: ``"pixels"`` (SimMIM: L1 regression) or ``"tokens"`` (BEiT: classification).
        masking: ``"random"`` (SimMIM: random square units) or ``"block"`` (BEiT: Algorithm 1).
        mask_ratio: fraction of patches masked (SimMIM 0.6, BEiT 0.4).
        mask_patch_size: side in pixels of SimMIM's masking unit (a multiple of the patch size).
        min_block_patches, block_min_aspect: BEiT block shape (16 patches, aspect 0.3 to 1/0.3);
            the minimum is capped at half the masked count on small grids.
        vocab_size, token_pool, tokenizer_iters: the k-means tokenizer (``target="tokens"``).
        crop_scale, vertical_flip: the view transform (random resized crop and flips).
        hed_p, hed_sigma, hed_bias: HED stain jitter of the view (off by default, as in the papers).
    """

    target: Literal["pixels", "tokens"] = "pixels"
    masking: Literal["random", "block"] = "random"
    mask_ratio: float = setting(0.6, range="(0, 1)")
    mask_patch_size: int = setting(32, range=">= 1", allow_zero=True)
    min_block_patches: int = setting(16, range=">= 1")
    block_min_aspect: float = setting(0.3, range="(0, 1]")
    vocab_size: int = setting(512, range=">= 2")
    token_pool: int = setting(4, range=">= 1")
    tokenizer_iters: int = setting(20, range=">= 1")
    crop_scale: tuple[float, float] = setting((0.67, 1.0), range="(0, 1]", ordered=True)
    vertical_flip: bool = True
    hed_p: float = setting(0.0, range="[0, 1]")
    hed_sigma: float = setting(0.05, range=">= 0")
    hed_bias: float = setting(0.01, range=">= 0")

    def __post_init__(self) -> None:
        check_config(self)  # types, choices and ranges declared above


SIMMIM = MIMConfig()
#: BEiT: block masking of 40 % and token targets (BEiT masks 75 of 196 patches).
BEIT = MIMConfig(target="tokens", masking="block", mask_ratio=0.4, crop_scale=(0.08, 1.0))

#: ``cpu_small``: single-patch masking units, a vocabulary for a few thousand patches, small
#: blocks, and mild crops (on 32 px tiles BEiT's 8 % crops would zoom a few pixels up to a tile).
PRESETS: dict[str, dict[str, Any]] = {
    "cpu_small": dict(mask_patch_size=0, vocab_size=64, min_block_patches=4, crop_scale=(0.67, 1.0)),
}


# --------------------------------------------------------------------------- masks and losses
def random_unit_mask(
    batch: int, grid: tuple[int, int], unit: int, mask_ratio: float, *,
    generator: torch.Generator | None = None, device: torch.device | str | None = None,
) -> torch.Tensor:
    """SimMIM masks ``(B, gh, gw)`` bool: ``ceil(ratio * U)`` of the ``U`` square units of ``unit x unit`` patches.

    Units are drawn uniformly without replacement, independently per sample, so every
    mask holds exactly ``ceil(ratio * U) * unit**2`` patches.
    """
    gh, gw = grid
    if unit < 1 or gh % unit or gw % unit:
        raise HistofmError(
            f"The {gh}x{gw} patch grid is not divisible into masking units of {unit}x{unit} patches; "
            "set mask_patch_size to a divisor of the image size that is a multiple of the patch size."
        )
    uh, uw = gh // unit, gw // unit
    count = math.ceil(uh * uw * mask_ratio)
    if count >= uh * uw:
        raise HistofmError(
            f"Masking {mask_ratio:.0%} of {uh * uw} masking units leaves nothing visible; lower mask_patch_size."
        )
    noise = torch.rand(batch, uh * uw, generator=generator, device=device if generator is None else generator.device)
    ids = noise.argsort(dim=1)[:, :count]
    m = torch.zeros(batch, uh * uw, dtype=torch.bool, device=noise.device).scatter_(1, ids, True)
    m = m.view(batch, uh, uw).repeat_interleave(unit, dim=1).repeat_interleave(unit, dim=2)  # (B, gh, gw)
    return m.to(device) if device is not None else m


def block_masks(
    batch: int, grid: tuple[int, int], mask_ratio: float, *, min_block_patches: int = 16, min_aspect: float = 0.3,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """BEiT masks ``(B, gh, gw)`` bool from :func:`~histofm.methods.masking.block_mask`, about ``ratio * N`` each."""
    gh, gw = grid
    num_mask = int(round(mask_ratio * gh * gw))
    min_patches = max(1, min(min_block_patches, num_mask // 2))  # small grids: smaller blocks
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))  # follows torch's seeding
    rng = random.Random(seed)
    return torch.stack([
        block_mask(gh, gw, num_mask, min_num_patches=min_patches, min_aspect=min_aspect, rng=rng) for _ in range(batch)
    ])


def simmim_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L1 over the pixels of masked patches: ``pred``/``target`` ``(B, N, p*p*C)``, ``mask`` ``(B, N)``."""
    per_patch = (pred - target).abs().mean(dim=-1)  # (B, N)
    m = mask.to(per_patch.dtype)
    return (per_patch * m).sum() / m.sum().clamp_min(1.0)


def token_loss(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy and accuracy of token predictions at masked positions.

    Args:
        logits: ``(B, N, K)``; tokens: ``(B, N)`` long; mask: ``(B, N)`` bool.
    """
    sel = mask.bool()
    lg, tk = logits[sel], tokens[sel]  # (M, K), (M,)
    loss = F.cross_entropy(lg.float(), tk)
    acc = (lg.argmax(-1) == tk).float().mean()
    return loss, acc


# --------------------------------------------------------------------------- method
class MIM(ReconstructionPictures, SSLMethod):
    """SimMIM (``cfg.target="pixels"``) or BEiT-style MIM (``"tokens"``) around a ViT with a mask token.

    Args:
        backbone: a ViT built with ``use_mask_token=True``.
        cfg: :class:`MIMConfig` (:data:`SIMMIM` or :data:`BEIT`).
        mean, std: input normalisation, used only for pictures.
    """

    def __init__(
        self, backbone: nn.Module, cfg: MIMConfig = SIMMIM,
        mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225),
    ) -> None:
        super().__init__()
        if getattr(backbone, "mask_token", None) is None:
            raise HistofmError("Masked image modelling needs a backbone built with use_mask_token=True.")
        self.backbone = backbone
        self.cfg = cfg
        self.patch_size = int(backbone.patch_size)
        if cfg.mask_patch_size and cfg.mask_patch_size % self.patch_size:
            raise HistofmError(
                f"mask_patch_size {cfg.mask_patch_size} is not a multiple of the patch size {self.patch_size}; "
                f"use a multiple of {self.patch_size} (or 0 to mask single patches)."
            )
        self.in_chans = backbone.patch_embed.proj.in_channels
        nn.init.trunc_normal_(backbone.mask_token, std=0.02)  # as SimMIM and BEiT (the ViT starts it at 0)
        self.tokenizer: KMeansTokenizer | None = None
        if cfg.target == "pixels":
            out = self.patch_size**2 * self.in_chans
        else:
            out = cfg.vocab_size
            self.tokenizer = KMeansTokenizer(cfg.vocab_size, cfg.token_pool, self.in_chans, cfg.tokenizer_iters)
        self.head = nn.Linear(backbone.embed_dim, out)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        self.register_buffer("img_mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("img_std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.step_callbacks: list[Callable[[nn.Module, int], Any]] = []

    # ---------------------------------------------------------------- pieces
    def make_masks(
        self, batch: int, grid: tuple[int, int], device: torch.device, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Masks ``(B, gh, gw)`` bool by the configured rule."""
        c = self.cfg
        if c.masking == "random":
            unit = max(1, c.mask_patch_size // self.patch_size) if c.mask_patch_size else 1
            return random_unit_mask(batch, grid, unit, c.mask_ratio, generator=generator, device=device)
        return block_masks(
            batch, grid, c.mask_ratio, min_block_patches=c.min_block_patches, min_aspect=c.block_min_aspect,
            generator=generator,
        ).to(device)

    @torch.no_grad()
    def fit_tokenizer(self, images: torch.Tensor, seed: int = 0) -> None:
        """Fit the k-means tokenizer on ``images`` ``(B, C, H, W)`` (normalised like the training input)."""
        if self.tokenizer is None:
            raise HistofmError("Only the BEiT-style method (target='tokens') has a tokenizer.")
        self.tokenizer.fit(images, self.patch_size, seed=seed)

    def predict(self, x: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Head outputs ``(B, N, out)`` for every patch of ``x`` with ``masks`` ``(B, gh, gw)`` applied."""
        B = x.shape[0]
        tokens = self.backbone.forward_features(x, masks.reshape(B, -1))  # (B, P + N, D)
        return self.head(tokens[:, self.backbone.num_prefix_tokens :])

    def _losses(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        B, _, H, W = x.shape
        grid = (H // self.patch_size, W // self.patch_size)
        masks = self.make_masks(B, grid, x.device, generator)  # (B, gh, gw)
        flat = masks.reshape(B, -1)
        pred = self.predict(x, masks)  # (B, N, out)
        if self.tokenizer is None:
            loss = simmim_loss(pred, patchify(x, self.patch_size), flat)
            out = {"loss": loss}
        else:
            if not bool(self.tokenizer.fitted):
                self.fit_tokenizer(x)  # lazily, on the first batch
            tokens = self.tokenizer.encode(x, self.patch_size)  # (B, N), of the unmasked image
            loss, acc = token_loss(pred, tokens, flat)
            out = {"loss": loss, "token_acc": acc.detach()}
        out["mask_ratio"] = flat.float().mean().detach()
        return out, pred, flat

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        return self._losses(images_of(batch))[0]

    # ---------------------------------------------------------------- pictures
    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Pictures ``input``, ``masked``, ``output``, ``pasted`` (``(B, C, H, W)`` in [0, 1]) and ``mse``.

        For SimMIM ``output`` is the predicted pixels and ``mse`` the masked L1 loss; for
        the BEiT-style variant ``output`` draws the predicted tokens with their centroids
        (coarse by construction), ``tokens`` draws the true tokens, and ``mse`` is the
        masked cross-entropy.
        """
        was_training = self.training
        self.eval()
        try:
            B, C, H, W = x.shape
            p = self.patch_size
            grid = (H // p, W // p)
            out, pred, flat = self._losses(x, generator)
            extra: dict[str, torch.Tensor] = {}
            if self.tokenizer is None:
                img = unpatchify(pred, p, grid, C)
            else:
                img = self.tokenizer.decode(pred.argmax(-1), p, grid)
                true_tokens = self.tokenizer.decode(self.tokenizer.encode(x, p), p, grid)
                extra["tokens"] = (true_tokens * self.img_std + self.img_mean).clamp(0, 1)
            pics = picture_set(x, img, flat, p, self.img_mean, self.img_std)
            return {**extra, **pics, "mse": out["loss"].detach()}
        finally:
            self.train(was_training)


# --------------------------------------------------------------------------- builder
def build(
    name: str, arch: str, *, img_size: int = 224, overrides: dict[str, Any] | None = None
) -> tuple[MIM, Callable[[Any], torch.Tensor]]:
    """``histofm pretrain --method simmim|beit``: the method on ``arch`` (with a mask token) and its transform.

    ``overrides`` sets :class:`MIMConfig` fields (``"preset"`` first applies one of
    :data:`PRESETS`; ``mask_patch_size=0`` masks single patches); backbone arguments
    go under ``"backbone"`` or as ``"backbone.<arg>"`` keys.
    """
    from histofm.registry import model_info

    if name not in ("simmim", "beit"):
        raise HistofmError(f"mim.py builds 'simmim' or 'beit', not {name!r}.")
    cfg_kw, backbone_kw = split_backbone_overrides(overrides or {})
    cfg = apply_preset(SIMMIM if name == "simmim" else BEIT, cfg_kw, PRESETS)
    backbone = make_backbone(arch, img_size, {**backbone_kw, "use_mask_token": True})
    if cfg.masking == "random" and cfg.mask_patch_size and img_size % cfg.mask_patch_size:
        raise HistofmError(
            f"img_size {img_size} is not a multiple of mask_patch_size {cfg.mask_patch_size}; "
            "change one of them (mask_patch_size=0 masks single patches)."
        )
    info = model_info(arch)
    method = MIM(backbone, cfg, mean=info.mean, std=info.std)
    return method, pretrain_transform(img_size, info.mean, info.std, cfg.crop_scale, cfg.vertical_flip,
                                      (cfg.hed_p, cfg.hed_sigma, cfg.hed_bias))
