"""MAE: masked autoencoders (He et al. 2021, "Masked Autoencoders Are Scalable Vision Learners", arXiv 2111.06377).

The image is cut into patches and a large random subset of them (75 %) is
removed, independently for every sample, by sorting a vector of uniform noise.
The ViT encoder sees only the visible 25 % (no mask tokens in the encoder, which
makes pretraining about 3x cheaper). A lightweight decoder receives the encoded
visible tokens, inserts one shared learned ``mask_token`` at each removed
position, adds fixed 2-D sine-cosine positions and predicts the pixels of every
patch. The loss is the mean squared error on the masked patches only, against
per-patch normalised pixels (``norm_pix_loss``, which the paper finds gives
better representations)::

    t_i = (x_i - mean(x_i)) / sqrt(var(x_i) + 1e-6)            # patch i, p*p*C values
    L = sum_i m_i * mean_j (y_ij - t_ij)^2 / sum_i m_i           # m_i = 1 where patch i was removed

``var`` is the unbiased variance, as in the official code. After pretraining
only the encoder (``backbone``) is kept.

The patch pieces (patchify, random masking, the visible-only encoder, the
decoder and the loss) are in :mod:`histofm.methods.patches`, shared with SimMIM,
BEiT and PLUTO. :meth:`MAE.reconstruct` computes reconstruction pictures (input,
mask, output side by side); :mod:`histofm.methods.pictures` writes them as PNGs
every few steps of training, outside the loss path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from histofm.methods.base import SSLMethod
from histofm.methods.patches import (
    MAEDecoder,
    denormalize_patches,
    encode_visible,
    mae_loss,
    patchify,
    random_masking,
    unpatchify,
)
from histofm.methods.pictures import ReconstructionPictures, picture_set
from histofm.methods.presets import apply_preset
from histofm.methods.views import images_of, make_backbone, pretrain_transform
from histofm.settings import check_config, setting, split_backbone_overrides


@dataclass(frozen=True)
class MAEConfig:
    """MAE hyper-parameters (paper defaults; shrink the decoder for tiny backbones).

    Attributes:
        mask_ratio: fraction of patches removed per sample.
        decoder_dim, decoder_depth, decoder_heads, decoder_mlp_ratio: decoder Transformer
            (paper: 512 wide, 8 blocks, 16 heads).
        norm_pix_loss: predict per-patch normalised pixels (paper's best setting).
        crop_scale: area range of the random resized crop (paper: 0.2 to 1).
        vertical_flip: also flip vertically (histology has no "up").
        hed_p, hed_sigma, hed_bias: HED stain jitter of the input (off by default, as in the paper); the
            target is the jittered image, so it teaches no invariance, only a wider range of stains.
    """

    mask_ratio: float = setting(0.75, range="[0, 1)")
    decoder_dim: int = setting(512, range=">= 1")
    decoder_depth: int = setting(8, range=">= 1")
    decoder_heads: int = setting(16, range=">= 1", divides="decoder_dim")
    decoder_mlp_ratio: float = setting(4.0, range="> 0")
    norm_pix_loss: bool = True
    crop_scale: tuple[float, float] = setting((0.2, 1.0), range="(0, 1]", ordered=True)
    vertical_flip: bool = True
    hed_p: float = setting(0.0, range="[0, 1]")
    hed_sigma: float = setting(0.05, range=">= 0")
    hed_bias: float = setting(0.01, range=">= 0")

    def __post_init__(self) -> None:
        check_config(self)



class MAE(ReconstructionPictures, SSLMethod):
    """Masked autoencoder around a ViT ``backbone`` (kept after pretraining) and a throw-away decoder.

    Args:
        backbone: a :class:`~histofm.models.vit.VisionTransformer` (or anything with the same token API).
        cfg: :class:`MAEConfig`.
        mean, std: the normalisation of the input images, used only to draw pictures.
    """

    def __init__(
        self, backbone: nn.Module, cfg: MAEConfig = MAEConfig(),
        mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225),
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.cfg = cfg
        self.patch_size = int(backbone.patch_size)
        in_chans = backbone.patch_embed.proj.in_channels
        self.in_chans = in_chans
        self.decoder = MAEDecoder(
            backbone.embed_dim, self.patch_size**2 * in_chans, decoder_dim=cfg.decoder_dim, depth=cfg.decoder_depth,
            num_heads=cfg.decoder_heads, mlp_ratio=cfg.decoder_mlp_ratio, num_prefix_tokens=backbone.num_prefix_tokens,
        )
        self.register_buffer("img_mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("img_std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.step_callbacks: list[Callable[[nn.Module, int], Any]] = []

    def _predict(
        self, x: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        B, _, H, W = x.shape
        p = self.patch_size
        grid = (H // p, W // p)
        ids_keep, mask, ids_restore = random_masking(
            B, grid[0] * grid[1], mask_ratio, device=x.device, generator=generator
        )
        latent = encode_visible(self.backbone, x, ids_keep)  # (B, P + K, D)
        pred = self.decoder(latent, ids_restore, grid)  # (B, N, p*p*C)
        return pred, mask

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        x = images_of(batch)  # (B, C, H, W), normalised
        pred, mask = self._predict(x, self.cfg.mask_ratio)
        target = patchify(x, self.patch_size)
        loss = mae_loss(pred, target, mask, self.cfg.norm_pix_loss)
        return {"loss": loss, "mask_ratio": mask.float().mean().detach()}

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Pictures of one masked reconstruction, all ``(B, C, H, W)`` in [0, 1] display space.

        Returns ``input``, ``masked`` (removed patches greyed out), ``output`` (the
        prediction, un-normalised with each true patch's mean and variance when
        ``norm_pix_loss``) and ``pasted`` (visible patches from the input, removed
        ones from the prediction), plus ``mse``: the masked-patch error in the
        loss's own units (a scalar tensor).
        """
        was_training = self.training
        self.eval()
        try:
            B, C, H, W = x.shape
            p = self.patch_size
            grid = (H // p, W // p)
            pred, mask = self._predict(x, self.cfg.mask_ratio, generator)
            target = patchify(x, p)
            mse = mae_loss(pred, target, mask, self.cfg.norm_pix_loss)
            if self.cfg.norm_pix_loss:
                pred = denormalize_patches(pred, target)
            return {**picture_set(x, unpatchify(pred, p, grid, C), mask, p, self.img_mean, self.img_std), "mse": mse}
        finally:
            self.train(was_training)


#: Named adaptations applied before user overrides (``overrides={"preset": name}``).
#: ``cpu_small``: a decoder sized for tiny backbones (ViT-Ti and below) and a few CPU minutes, and
#: RAW-pixel targets: per-patch normalisation removes each patch's stain colour and intensity,
#: which in a few hundred steps is most of what a tiny encoder can learn; on the bundled
#: nest-vs-stroma kNN check raw targets gave +0.012 to +0.019 over random initialisation in
#: 200 steps (3 seeds) where norm-pix gave -0.003 to +0.006 (docs/mim.md, "Results on CPU").
PRESETS: dict[str, dict[str, Any]] = {
    "cpu_small": dict(decoder_dim=128, decoder_depth=2, decoder_heads=4, norm_pix_loss=False),
}


def build(
    name: str, arch: str, *, img_size: int = 224, overrides: dict[str, Any] | None = None
) -> tuple[MAE, Callable[[Any], torch.Tensor]]:
    """Build MAE on ``histofm.create_model(arch, img_size=img_size, ...)`` and its per-sample transform.

    ``overrides`` sets :class:`MAEConfig` fields (``"preset"`` first applies one of
    :data:`PRESETS`); backbone constructor arguments go under ``"backbone"`` (a dict)
    or as ``"backbone.<arg>"`` keys.
    """
    from histofm.registry import model_info

    cfg_kw, backbone_kw = split_backbone_overrides(overrides or {})
    cfg = apply_preset(MAEConfig(), cfg_kw, PRESETS)
    backbone = make_backbone(arch, img_size, backbone_kw)
    info = model_info(arch)
    method = MAE(backbone, cfg, mean=info.mean, std=info.std)
    return method, pretrain_transform(img_size, info.mean, info.std, cfg.crop_scale, cfg.vertical_flip,
                                      (cfg.hed_p, cfg.hed_sigma, cfg.hed_bias))
