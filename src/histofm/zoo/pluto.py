"""PathAI's PLUTO: a FlexiViT-S whose patch size is chosen at run time. No public weights.

PLUTO (Juyal et al. 2024, arXiv 2405.07905) is a ViT-S (width 384, 12 blocks,
6 heads, GELU MLP 1536, ~22M parameters) in the FlexiViT style (Beyer et al.
2023, arXiv 2212.08013): one set of weights serves patch sizes 8, 16 and 32, so
the same tile can be read at fine (28 x 28 tokens) or coarse (7 x 7) granularity.
It is pretrained with DINOv2/iBOT plus an MAE and a Fourier loss on 195M tiles
from 158k slides at 0.25/0.5/1/2 um/px.

FlexiViT keeps one underlying patch kernel ``w`` (here 16 x 16) and one position
table (here 14 x 14 for 224 px). For patch size ``p`` the kernel is resized with
the pseudo-inverse resize, which keeps a patch's token unchanged when the patch
itself is resized by the same operator ``B``::

    w_p = pinv(B^T) w        so that   <B x, w_p> = <x, w>

and the position table is resampled (bicubic, antialiased) to the new grid.

Unverified [U]: the underlying kernel and grid sizes, register tokens (none
here), LayerScale (1e-5 here, the DINOv2 default), and the normalisation
statistics (ImageNet here). Only the architecture is provided.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from histofm._registry import ModelInfo, register_model
from histofm.layers.patch_embed import resize_patch_embed
from histofm.models.vit import VisionTransformer
from histofm.zoo._common import arxiv

StateDict = dict[str, torch.Tensor]


class FlexiVisionTransformer(VisionTransformer):
    """A :class:`VisionTransformer` that accepts any patch size at run time (FlexiViT).

    Args:
        patch_sizes: the patch sizes the model was trained with (informative; any
            positive size is accepted, as in FlexiViT).
        **kwargs: :class:`VisionTransformer` arguments; ``patch_size`` is the size of
            the stored (underlying) kernel and the default run-time patch size.
    """

    def __init__(self, patch_sizes: tuple[int, ...] = (8, 16, 32), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.patch_sizes = tuple(int(p) for p in patch_sizes)
        self.base_patch_size = self.patch_embed.patch_size[0]

    def set_patch_size(self, patch_size: int) -> None:
        """Use ``patch_size`` for every following forward pass (``model.patch_size`` follows)."""
        if int(patch_size) <= 0:
            raise ValueError(f"patch size must be positive, got {patch_size}")
        self.patch_size = int(patch_size)

    def embed_patches(self, x: torch.Tensor, patch_size: int | None = None) -> torch.Tensor:
        """Image ``(B, C, H, W)`` to patch tokens ``(B, H/p, W/p, D)`` with the PI-resized kernel."""
        p = int(patch_size or self.patch_size)
        H, W = x.shape[-2:]
        if H % p or W % p:
            raise ValueError(f"input size {H}x{W} is not a multiple of the patch size {p}")
        proj = self.patch_embed.proj
        weight = resize_patch_embed(proj.weight, (p, p))  # (D, C, p, p)
        return F.conv2d(x, weight, proj.bias, stride=p).permute(0, 2, 3, 1)

    def prepare_tokens(
        self, x: torch.Tensor, masks: torch.Tensor | None = None, patch_size: int | None = None
    ) -> torch.Tensor:
        """Tokens ``(B, P + N, D)`` for patch size ``patch_size`` (default: ``self.patch_size``)."""
        x = self.embed_patches(x, patch_size)  # (B, H', W', D)
        if masks is not None:
            if self.mask_token is None:
                raise ValueError("masked input needs a model built with use_mask_token=True")
            B, H, W, D = x.shape
            m = masks.reshape(B, H, W, 1).to(x.dtype)
            x = x * (1 - m) + self.mask_token.to(x.dtype).view(1, 1, 1, D) * m
        return self._pos_embed(x)  # position table resampled from the stored grid

    def forward_features(
        self, x: torch.Tensor, masks: torch.Tensor | None = None, patch_size: int | None = None
    ) -> torch.Tensor:
        """All tokens after the final norm, ``(B, P + (H/p)(W/p), D)``."""
        x = self.prepare_tokens(x, masks, patch_size)
        return self.norm(self.blocks(x))

    def forward(self, x: torch.Tensor, patch_size: int | None = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, patch_size=patch_size))


def _pluto_filter(sd: StateDict, model: torch.nn.Module) -> StateDict:
    """Bring a FlexiViT checkpoint stored with another underlying kernel size to ours (PI-resize)."""
    key = "patch_embed.proj.weight"
    base = getattr(model, "base_patch_size", None)
    if key in sd and base is not None and tuple(sd[key].shape[-2:]) != (base, base):
        sd = dict(sd)
        sd[key] = resize_patch_embed(sd[key], (base, base))
    return sd


PLUTO = ModelInfo(
    name="pluto",
    arch="FlexiViT-S (patch 8/16/32)",
    arch_kwargs=dict(
        img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6, init_values=1e-5,
        patch_sizes=(8, 16, 32),
    ),
    embed_dim=384,
    embedding="class token after the final norm (any patch size)",
    public_weights=False,
    license="n/a (no public weights)",
    paper=arxiv("2405.07905"),
    method="DINOv2/iBOT + MAE + Fourier loss, FlexiViT patch sizes, multi-scale tiles",
    data="195M tiles from 158k WSIs at 0.25/0.5/1/2 um/px",
    num_params=21_674_880,
    pretrain_config="pluto",
    notes="No public weights; kernel/grid sizes, registers, LayerScale and mean/std are assumptions [U].",
)


@register_model(info=PLUTO, filter_fn=_pluto_filter)
def pluto(**kwargs: Any) -> FlexiVisionTransformer:
    """PLUTO FlexiViT-S; choose the patch size with ``model(x, patch_size=8)`` or ``set_patch_size``."""
    return FlexiVisionTransformer(**{**PLUTO.arch_kwargs, **kwargs})
