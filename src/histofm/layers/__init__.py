"""Building blocks shared by two or more models or methods."""

from histofm.layers.attention import Attention
from histofm.layers.mlp import Mlp, SwiGLUPacked
from histofm.layers.patch_embed import PatchEmbed, to_2tuple
from histofm.layers.pos_embed import resample_abs_pos_embed, sincos_1d, sincos_2d
from histofm.layers.regularization import DropPath, LayerScale, drop_path

__all__ = [
    "Attention",
    "DropPath",
    "LayerScale",
    "Mlp",
    "PatchEmbed",
    "SwiGLUPacked",
    "drop_path",
    "resample_abs_pos_embed",
    "sincos_1d",
    "sincos_2d",
    "to_2tuple",
]
