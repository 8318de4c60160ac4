"""Model definitions: the Transformer, the Vision Transformer, text encoders, converters."""

from histofm.models.vit import Block, VisionTransformer

__all__ = ["Block", "VisionTransformer"]
