"""Patch-level pieces of the masked-image methods (MAE, SimMIM/BEiT, PLUTO's MAE term).

No method owns them, so no method file imports another; each piece is small enough
to read here once:

* :func:`patchify` / :func:`unpatchify`: images ``(B, C, H, W)`` <-> patches ``(B, N, p*p*C)``.
* :func:`random_masking`: MAE's per-sample masking by sorting uniform noise (exactly
  ``int(N * (1 - ratio))`` visible patches per sample).
* :func:`normalize_patches` / :func:`denormalize_patches`: the per-patch standardisation of
  ``norm_pix_loss`` and its inverse (for pictures).
* :func:`mae_loss`: MSE on the masked patches only (MAE's loss, PLUTO's MAE term).
* :func:`encode_visible`: a ViT run on its prefix tokens and the kept patches only.
* :class:`MAEDecoder`: the lightweight decoder that inserts mask tokens and predicts pixels.

The loss, with ``m_i = 1`` where patch ``i`` was removed and ``t`` the target patch
(per-patch normalised when ``norm_pix``)::

    L = sum_i m_i * mean_j (y_ij - t_ij)^2 / sum_i m_i
"""

from __future__ import annotations

import torch
from torch import nn

from histofm.errors import HistofmError
from histofm.layers import sincos_2d
from histofm.models.vit import Block


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


def denormalize_patches(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Undo :func:`normalize_patches` on predictions with each TRUE patch's mean and variance (for display)."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return pred * (var + eps) ** 0.5 + mean


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
