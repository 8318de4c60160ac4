"""Generic ViT architectures under timm's names (no weights attached), registered into the zoo.

Each builder takes the same keyword overrides as :class:`VisionTransformer`, so
``create_model("vit_small_patch16_224", depth=4, drop_path_rate=0.1)`` works.
"""

from __future__ import annotations

from typing import Any

from histofm._registry import register_model
from histofm.models.vit import VisionTransformer


def _vit(defaults: dict[str, Any], overrides: dict[str, Any]) -> VisionTransformer:
    return VisionTransformer(**{**defaults, **overrides})


@register_model
def vit_tiny_patch16_224(**kwargs: Any) -> VisionTransformer:
    return _vit(dict(patch_size=16, embed_dim=192, depth=12, num_heads=3), kwargs)


@register_model
def vit_tiny_patch8_224(**kwargs: Any) -> VisionTransformer:
    return _vit(dict(patch_size=8, embed_dim=192, depth=12, num_heads=3), kwargs)


@register_model
def vit_small_patch16_224(**kwargs: Any) -> VisionTransformer:
    return _vit(dict(patch_size=16, embed_dim=384, depth=12, num_heads=6), kwargs)


@register_model
def vit_small_patch8_224(**kwargs: Any) -> VisionTransformer:
    return _vit(dict(patch_size=8, embed_dim=384, depth=12, num_heads=6), kwargs)


@register_model
def vit_small_patch14_dinov2(**kwargs: Any) -> VisionTransformer:
    return _vit(dict(img_size=518, patch_size=14, embed_dim=384, depth=12, num_heads=6, init_values=1e-5), kwargs)


@register_model
def vit_base_patch14_dinov2(**kwargs: Any) -> VisionTransformer:
    return _vit(dict(img_size=518, patch_size=14, embed_dim=768, depth=12, num_heads=12, init_values=1e-5), kwargs)


@register_model
def vit_base_patch16_224(**kwargs: Any) -> VisionTransformer:
    return _vit(dict(patch_size=16, embed_dim=768, depth=12, num_heads=12), kwargs)


@register_model
def vit_base_patch8_224(**kwargs: Any) -> VisionTransformer:
    return _vit(dict(patch_size=8, embed_dim=768, depth=12, num_heads=12), kwargs)


@register_model
def vit_large_patch16_224(**kwargs: Any) -> VisionTransformer:
    return _vit(dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16), kwargs)


@register_model
def vit_large_patch14_dinov2(**kwargs: Any) -> VisionTransformer:
    return _vit(dict(img_size=518, patch_size=14, embed_dim=1024, depth=24, num_heads=16, init_values=1e-5), kwargs)


@register_model
def vit_large_patch14_reg4_dinov2(**kwargs: Any) -> VisionTransformer:
    return _vit(
        dict(img_size=518, patch_size=14, embed_dim=1024, depth=24, num_heads=16, init_values=1e-5,
             reg_tokens=4, no_embed_class=True),
        kwargs,
    )


@register_model
def vit_huge_patch14_224(**kwargs: Any) -> VisionTransformer:
    return _vit(dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16), kwargs)


@register_model
def vit_giant_patch14_reg4_dinov2(**kwargs: Any) -> VisionTransformer:
    return _vit(
        dict(img_size=518, patch_size=14, embed_dim=1536, depth=40, num_heads=24, init_values=1e-5,
             mlp_ratio=2.66667 * 2, mlp_layer="swiglu", reg_tokens=4, no_embed_class=True),
        kwargs,
    )
