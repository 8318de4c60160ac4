"""FlexiViT (Beyer et al. 2023, arXiv 2212.08013): one ViT whose patch size is chosen at run time.

One set of weights serves several patch sizes (say 8, 16 and 32), so the same image
can be read at fine (28 x 28 tokens at 224 px) or coarse (7 x 7) granularity.
FlexiViT keeps one underlying patch kernel ``w`` (for example 16 x 16) and one
position table. For patch size ``p`` the kernel is resized with the pseudo-inverse
resize, which keeps a patch's token unchanged when the patch itself is resized by
the same operator ``B``::

    w_p = pinv(B^T) w        so that   <B x, w_p> = <x, w>

and the position table is resampled (bicubic, antialiased) to the new grid.
Parameter names are those of :class:`~histofm.models.vit.VisionTransformer`.
PathAI's PLUTO (``histofm.create_model("pluto")``, :mod:`histofm.zoo.pluto`) is one.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from histofm.errors import HistofmError
from histofm.layers.patch_embed import resize_patch_embed
from histofm.models.vit import VisionTransformer


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
            raise HistofmError(f"The patch size must be positive, got {patch_size}; pass one of the model's patch_sizes.")
        self.patch_size = int(patch_size)

    def embed_patches(self, x: torch.Tensor, patch_size: int | None = None) -> torch.Tensor:
        """Image ``(B, C, H, W)`` to patch tokens ``(B, H/p, W/p, D)`` with the PI-resized kernel."""
        p = int(patch_size or self.patch_size)
        H, W = x.shape[-2:]
        if H % p or W % p:
            raise HistofmError(f"Input size {H}x{W} is not a multiple of the patch size {p}; resize or crop the images to a multiple of it.")
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
                raise HistofmError("Masked input needs a model built with use_mask_token=True; build it with that argument.")
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
