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

The file also holds the reconstruction pictures (input, mask, output side by
side): :meth:`MAE.reconstruct` computes them and :func:`save_reconstructions`
writes them as a PNG; :class:`ReconstructionCallback` does both every few steps
of training, outside the loss path.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from histofm.errors import HistofmError
from histofm.layers import sincos_2d
from histofm.methods.base import SSLMethod
from histofm.models.vit import Block
from histofm.settings import check_config, config_replace, setting, split_backbone_overrides
from histofm.utils import atomic_path
from histofm.utils.distributed import is_main


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
    """

    mask_ratio: float = setting(0.75, range="[0, 1)")
    decoder_dim: int = setting(512, range=">= 1")
    decoder_depth: int = setting(8, range=">= 1")
    decoder_heads: int = setting(16, range=">= 1", divides="decoder_dim")
    decoder_mlp_ratio: float = setting(4.0, range="> 0")
    norm_pix_loss: bool = True
    crop_scale: tuple[float, float] = setting((0.2, 1.0), range="(0, 1]", ordered=True)
    vertical_flip: bool = True

    def __post_init__(self) -> None:
        check_config(self)



# --------------------------------------------------------------------------- patches and masking
def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Images ``(B, C, H, W)`` to patches ``(B, N, p*p*C)`` in row-major patch order (pixel order p, p, C)."""
    B, C, H, W = imgs.shape
    p = patch_size
    if H % p or W % p:
        raise HistofmError(f"Image size {H}x{W} is not a multiple of the patch size {p}; resize or crop the tiles.")
    h, w = H // p, W // p
    x = imgs.reshape(B, C, h, p, w, p).permute(0, 2, 4, 3, 5, 1)  # (B, h, w, p, p, C)
    return x.reshape(B, h * w, p * p * C)


def unpatchify(patches: torch.Tensor, patch_size: int, grid: tuple[int, int], channels: int = 3) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``(B, N, p*p*C)`` to ``(B, C, h*p, w*p)``."""
    B = patches.shape[0]
    h, w = grid
    p = patch_size
    x = patches.reshape(B, h, w, p, p, channels).permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p, w, p)
    return x.reshape(B, channels, h * p, w * p)


def random_masking(
    batch: int, num_patches: int, mask_ratio: float, *, device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random masking by shuffling (MAE).

    Every sample keeps exactly ``int(N * (1 - mask_ratio))`` patches, chosen by
    sorting uniform noise, so each subset of that size is equally likely.

    Returns:
        ids_keep ``(B, K)``: indices of the kept patches (in shuffled order);
        mask ``(B, N)`` bool, True where the patch was removed;
        ids_restore ``(B, N)``: the permutation that puts ``[kept, removed]`` back in place.
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise HistofmError(f"mask_ratio must be in [0, 1), got {mask_ratio}; pass e.g. 0.75.")
    keep = int(num_patches * (1 - mask_ratio) + 1e-9)  # the tolerance keeps int(10 * (1 - 0.9)) at 1
    if keep < 1:
        raise HistofmError(
            f"mask_ratio {mask_ratio} leaves no visible patch out of {num_patches}; lower it or use larger images."
        )
    noise = torch.rand(batch, num_patches, device=device, generator=generator)  # (B, N)
    ids_shuffle = noise.argsort(dim=1)  # ascending: small noise is kept
    ids_restore = ids_shuffle.argsort(dim=1)
    ids_keep = ids_shuffle[:, :keep]
    mask = torch.ones(batch, num_patches, dtype=torch.bool, device=noise.device)
    mask[:, :keep] = False
    mask = mask.gather(1, ids_restore)  # back to the original patch order
    return ids_keep, mask, ids_restore


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``x[b, ids[b]]`` for tokens ``(B, N, D)`` and indices ``(B, K)`` -> ``(B, K, D)``."""
    return x.gather(1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def normalize_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-patch standardisation ``(x - mean) / sqrt(var + eps)`` over the last dim (unbiased var)."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps) ** 0.5


def mae_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool = True) -> torch.Tensor:
    """MSE averaged over pixels, then over the masked patches only.

    Args:
        pred: predicted patches ``(B, N, p*p*C)``.
        target: true patches ``(B, N, p*p*C)`` (raw; normalised here when ``norm_pix``).
        mask: ``(B, N)``, 1 / True where the patch was removed.
        norm_pix: standardise each target patch first.
    """
    if norm_pix:
        target = normalize_patches(target)
    per_patch = (pred - target).pow(2).mean(dim=-1)  # (B, N)
    m = mask.to(per_patch.dtype)
    return (per_patch * m).sum() / m.sum().clamp_min(1.0)


# --------------------------------------------------------------------------- encoder and decoder
def encode_visible(
    backbone: nn.Module, x: torch.Tensor, ids_keep: torch.Tensor | None, tokens: torch.Tensor | None = None
) -> torch.Tensor:
    """Run the ViT on its prefix tokens and the kept patch tokens only.

    ``backbone.prepare_tokens`` embeds the patches and adds positions (for every
    patch, so each kept token carries its true location); the removed tokens are
    then dropped before the Transformer blocks.

    Args:
        backbone: a ViT with ``prepare_tokens``, ``blocks``, ``norm`` and ``num_prefix_tokens``.
        x: images ``(B, C, H, W)``.
        ids_keep: ``(B, K)`` patch indices to keep; ``None`` keeps all.
        tokens: already prepared tokens ``(B, P + N, D)`` (skips ``prepare_tokens``).

    Returns:
        normalised tokens ``(B, P + K, D)``.
    """
    if tokens is None:
        tokens = backbone.prepare_tokens(x)  # (B, P + N, D)
    P = backbone.num_prefix_tokens
    prefix, patches = tokens[:, :P], tokens[:, P:]
    if ids_keep is not None:
        patches = gather_tokens(patches, ids_keep)  # (B, K, D)
    h = torch.cat([prefix, patches], dim=1)
    h = backbone.blocks(h)
    return backbone.norm(h)


class MAEDecoder(nn.Module):
    """Lightweight Transformer decoder: mask tokens, fixed 2-D sin-cos positions, per-patch pixel head.

    Parameter names follow the official MAE (``decoder_embed``, ``mask_token``,
    ``decoder_blocks``, ``decoder_norm``, ``decoder_pred``).
    """

    def __init__(
        self, embed_dim: int, out_dim: int, *, decoder_dim: int = 512, depth: int = 8, num_heads: int = 16,
        mlp_ratio: float = 4.0, num_prefix_tokens: int = 1,
    ) -> None:
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.decoder_dim = decoder_dim
        self.decoder_embed = nn.Linear(embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_blocks = nn.Sequential(*[Block(decoder_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, out_dim)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)  # as the official MAE
                nn.init.zeros_(m.bias)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Encoded ``(B, P + K, D)`` tokens to per-patch predictions ``(B, N, out_dim)`` in patch order."""
        P = self.num_prefix_tokens
        x = self.decoder_embed(latent)  # (B, P + K, Dd)
        prefix, visible = x[:, :P], x[:, P:]
        B, K, Dd = visible.shape
        N = ids_restore.shape[1]
        full = torch.cat([visible, self.mask_token.expand(B, N - K, -1)], dim=1)  # (B, N, Dd), shuffled order
        full = gather_tokens(full, ids_restore)  # unshuffle to patch order
        pos = sincos_2d(grid, Dd).to(device=full.device, dtype=full.dtype)  # (N, Dd), fixed
        x = torch.cat([prefix, full + pos], dim=1)  # prefix tokens get position 0, as in MAE
        x = self.decoder_norm(self.decoder_blocks(x))
        return self.decoder_pred(x[:, P:])  # (B, N, out_dim)


def images_of(batch: Any) -> torch.Tensor:
    """Accept a tensor batch or ``(images, labels, ...)`` from an image-folder style loader."""
    x = batch[0] if isinstance(batch, (list, tuple)) else batch
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        raise HistofmError("The masked-image methods expect a batch of images (B, C, H, W); check the view transform.")
    return x


class ReconstructionPictures:
    """Mixin of the masked-image methods: pictures of reconstructions saved while training.

    The method must define ``reconstruct(images)`` (the pictures to draw); see
    :func:`attach_reconstructions`.
    """

    @torch.no_grad()
    def on_step_end(self, step: int, max_steps: int) -> None:
        """Runs the attached step callbacks (reconstruction pictures) with the number of steps done."""
        run_step_callbacks(self, step)

    def attach_reconstructions(
        self, images: torch.Tensor, out_dir: str | os.PathLike[str], every: int = 100
    ) -> ReconstructionCallback:
        """Save reconstructions of ``images`` to ``out_dir`` now and every ``every`` steps of training."""
        return attach_reconstructions(self, images, out_dir, every)


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


# --------------------------------------------------------------------------- pictures
def denormalize_patches(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Undo :func:`normalize_patches` on predictions with each TRUE patch's mean and variance (for display)."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return pred * (var + eps) ** 0.5 + mean


def picture_set(
    x: torch.Tensor, output: torch.Tensor, mask: torch.Tensor, patch_size: int,
    mean: torch.Tensor, std: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Display images ``(B, C, H, W)`` in [0, 1] of a masked prediction.

    Args:
        x: the input (normalised); output: the prediction in the same space, every patch.
        mask: ``(B, N)`` True where the patch was hidden from the model.
        patch_size: patch side; mean, std: ``(1, C, 1, 1)`` input normalisation.

    Returns:
        ``input``, ``masked`` (hidden patches grey), ``output``, ``pasted`` (visible
        patches from the input, hidden ones from the prediction).
    """
    B, C, H, W = x.shape
    p = patch_size
    pix_mask = unpatchify(mask[..., None].to(x.dtype).expand(-1, -1, p * p * C), p, (H // p, W // p), C)

    def show(t: torch.Tensor) -> torch.Tensor:
        return (t * std.to(t) + mean.to(t)).clamp(0, 1)

    return {
        "input": show(x),
        "masked": show(x) * (1 - pix_mask) + 0.5 * pix_mask,
        "output": show(output),
        "pasted": show(x * (1 - pix_mask) + output * pix_mask),
    }


def save_reconstructions(pictures: dict[str, torch.Tensor], path: str | os.PathLike[str], title: str = "") -> Path:
    """Write a PNG grid: one row per image, columns input | masked | (tokens) | output | visible + output.

    Args:
        pictures: the dict from :meth:`MAE.reconstruct` (or any with ``input``, ``masked``, ``output``).
        path: PNG file to write (atomically).
        title: optional figure title (for example the step and the masked MSE).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [c for c in ("input", "masked", "tokens", "output", "pasted") if c in pictures]
    rows = pictures[columns[0]].shape[0]
    fig, axes = plt.subplots(rows, len(columns), figsize=(2.2 * len(columns), 2.2 * rows), squeeze=False)
    for r in range(rows):
        for c, name in enumerate(columns):
            ax = axes[r][c]
            ax.imshow(pictures[name][r].permute(1, 2, 0).float().cpu().numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title({"pasted": "visible + output"}.get(name, name), fontsize=9)
    fig.tight_layout()
    if title:
        fig.suptitle(title, fontsize=10, y=1.0, va="bottom")
    target = Path(path)
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return target


class ReconstructionCallback:
    """Save MAE reconstructions of fixed images every ``every`` steps (``recon_step{N}.png`` in ``out_dir``).

    Call it as ``callback(method, step)`` (after the optimiser step); it is a no-op on
    other steps. The same masks are drawn every time (fixed seed), so pictures from
    different steps show the same patches removed and can be compared by eye.
    """

    def __init__(self, images: torch.Tensor, out_dir: str | os.PathLike[str], every: int = 100, seed: int = 0) -> None:
        self.images = images
        self.out_dir = Path(out_dir)
        self.every = every
        self.seed = seed
        self.history: list[tuple[int, float]] = []  # (step, masked MSE)

    def __call__(self, method: nn.Module, step: int) -> Path | None:
        if self.every <= 0 or step % self.every or not is_main():
            return None
        return self.save(method, step)

    def save(self, method: nn.Module, step: int) -> Path:
        """Reconstruct the fixed images now and write ``recon_step{step}.png``; returns the path."""
        device = next(method.parameters()).device
        gen = torch.Generator(device=device).manual_seed(self.seed)
        pics = method.reconstruct(self.images.to(device), generator=gen)
        mse = float(pics["mse"])
        self.history.append((step, mse))
        return save_reconstructions(pics, self.out_dir / f"recon_step{step}.png", f"step {step}, masked-patch loss {mse:.3f}")


def run_step_callbacks(method: nn.Module, step: int) -> None:
    """Call ``method.step_callbacks`` with the number of optimiser steps done (``step + 1``)."""
    for callback in getattr(method, "step_callbacks", []):
        callback(method, step + 1)


def attach_reconstructions(
    method: nn.Module, images: torch.Tensor, out_dir: str | os.PathLike[str], every: int = 100
) -> ReconstructionCallback:
    """Save ``method.reconstruct(images)`` pictures now (step 0) and every ``every`` steps of training.

    The engine calls ``method.on_step_end`` after every optimiser step, which runs the
    callback; the pictures are ``out_dir/recon_step{N}.png``.
    """
    callback = ReconstructionCallback(images, out_dir, every)
    callback.save(method, 0)
    method.step_callbacks.append(callback)
    return callback


# --------------------------------------------------------------------------- builder
def make_config(base: Any, overrides: dict[str, Any], presets: dict[str, dict[str, Any]]) -> Any:  # noqa: ANN401
    """``base`` with ``overrides["preset"]`` applied first, then the other overrides (unknown keys fail loudly)."""
    overrides = dict(overrides)
    preset = overrides.pop("preset", None)
    if preset is not None:
        if preset not in presets:
            raise HistofmError(f"Unknown preset {preset!r} for {type(base).__name__}; choose one of: {', '.join(sorted(presets))}.")
        base = config_replace(base, presets[preset])
    return config_replace(base, overrides)


def pretrain_transform(
    img_size: int, mean: Sequence[float], std: Sequence[float], crop_scale: tuple[float, float] = (0.2, 1.0),
    vertical_flip: bool = True,
) -> Callable[[Any], torch.Tensor]:
    """MAE's augmentation: random resized crop, flips, to tensor, normalise (no colour jitter)."""
    from torchvision import transforms as T

    ops: list[Any] = [
        T.RandomResizedCrop(img_size, scale=crop_scale, interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
    ]
    if vertical_flip:
        ops.append(T.RandomVerticalFlip())
    ops += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(ops)


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
    from histofm.registry import create_model, model_info

    cfg_kw, backbone_kw = split_backbone_overrides(overrides or {})
    cfg = make_config(MAEConfig(), cfg_kw, PRESETS)
    backbone = create_model(arch, **{"img_size": img_size, **backbone_kw})
    info = model_info(arch)
    method = MAE(backbone, cfg, mean=info.mean, std=info.std)
    return method, pretrain_transform(img_size, info.mean, info.std, cfg.crop_scale, cfg.vertical_flip)
