"""A UNETR-style decoder over ViT block outputs (dense prediction from a plain ViT).

UNETR (Hatamizadeh et al. 2022, arXiv 2103.10497) and CellViT (Hörst et al. 2024,
arXiv 2306.15350) turn a ViT, whose every block works at one resolution
(``1/p`` of the image for patch size ``p``), into a U-Net: features of
``S = log2(p)`` blocks, taken from shallow to deep, become the skip connections
of a convolutional decoder that doubles the resolution ``S`` times::

    z_S = block_{i_S}(x)                        # (B, D, H/p, W/p)  bottleneck
    skip_s = Up^{S-s}(block_{i_s}(x))           # (B, C_s, H/2^s, W/2^s),  s = 1..S-1
    skip_0 = Conv(image)                        # (B, C_0, H, W)
    y = z_S;  for s = S-1 .. 0:  y = Conv([Up(y); skip_s])   # (B, C_s, H/2^s, W/2^s)

``Up`` is a 2x2 transposed convolution (stride 2) followed by a 3x3 convolution,
batch norm and ReLU. Shallow blocks keep local detail (edges, texture) and
deep blocks carry context; the image skip restores full-resolution boundaries
that 8x8 or 16x16 patches cannot draw. The decoder returns a full-resolution
map ``(B, C_0, H, W)``; task heads (for example :mod:`histofm.cells.hovernet`)
put 1x1 convolutions on it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from histofm.errors import HistofmError


class ConvBlock(nn.Sequential):
    """``n`` times (3x3 convolution, batch norm, ReLU)."""

    def __init__(self, in_ch: int, out_ch: int, n: int = 2) -> None:
        layers: list[nn.Module] = []
        for i in range(n):
            layers += [
                nn.Conv2d(in_ch if i == 0 else out_ch, out_ch, 3, padding=1, bias=False),
                nn.BatchNorm2d(out_ch),
                nn.ReLU(inplace=True),
            ]
        super().__init__(*layers)


class UpBlock(nn.Sequential):
    """Double the resolution: 2x2 transposed convolution (stride 2), then one :class:`ConvBlock` layer."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(nn.ConvTranspose2d(in_ch, out_ch, 2, stride=2), ConvBlock(out_ch, out_ch, n=1))


def default_layer_indices(depth: int, stages: int) -> list[int]:
    """``stages`` block indices spread evenly over ``depth`` blocks, ending with the last (CellViT: 3, 6, 9, 12)."""
    if stages > depth:
        raise HistofmError(f"A decoder with {stages} stages needs at least {stages} blocks, the encoder has {depth}; use a deeper encoder or a larger patch size.")
    return [round(depth * (k + 1) / stages) - 1 for k in range(stages)]


class UNETRDecoder(nn.Module):
    """UNETR decoder: ViT feature maps of ``log2(patch_size)`` blocks plus the image to a full-resolution map.

    Args:
        embed_dim: channels ``D`` of the ViT feature maps.
        patch_size: the ViT's patch size, a power of two (8 gives 3 stages, 16 gives 4).
        in_chans: image channels (for the full-resolution skip).
        widths: decoder channels at scales ``1, 1/2, ..., 1/2^(S-1)``; ``None`` picks
            ``32 * 2^s`` capped at 256.
    """

    def __init__(
        self, embed_dim: int, patch_size: int, in_chans: int = 3, widths: Sequence[int] | None = None
    ) -> None:
        super().__init__()
        stages = int(round(math.log2(patch_size))) if patch_size > 0 else 0
        if stages < 1 or 2**stages != patch_size:
            raise HistofmError(f"The UNETR decoder needs a power-of-two patch size >= 2, got {patch_size}; choose an encoder with patch size 8, 16 or 32.")
        widths = list(widths) if widths is not None else [min(32 * 2**s, 256) for s in range(stages)]
        if len(widths) != stages:
            raise HistofmError(f"widths needs {stages} entries (one per scale) for patch size {patch_size}; pass {stages} widths.")
        self.stages = stages
        self.patch_size = patch_size
        self.out_channels = widths[0]
        self.image_skip = ConvBlock(in_chans, widths[0])
        # skips[s - 1] brings block features from 1/p up to 1/2^s, s = 1..S-1 (S - s doublings).
        self.skips = nn.ModuleList()
        for s in range(1, stages):
            chans = [embed_dim] + [widths[t] for t in range(stages - 1, s - 1, -1)]
            self.skips.append(nn.Sequential(*(UpBlock(chans[i], chans[i + 1]) for i in range(stages - s))))
        # ups[s] doubles the running map from 1/2^(s+1) to 1/2^s; fuse[s] mixes it with skip_s.
        self.ups = nn.ModuleList(
            UpBlock(embed_dim if s == stages - 1 else widths[s + 1], widths[s]) for s in range(stages)
        )
        self.fuse = nn.ModuleList(ConvBlock(2 * widths[s], widths[s]) for s in range(stages))

    def forward(self, image: torch.Tensor, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Image ``(B, C, H, W)`` and ``S`` feature maps ``(B, D, H/p, W/p)``, shallow to deep -> ``(B, C_0, H, W)``."""
        if len(features) != self.stages:
            raise HistofmError(f"The decoder takes {self.stages} feature maps, got {len(features)}; pass one per layer index of the encoder.")
        skips = [self.image_skip(image)] + [up(f) for up, f in zip(self.skips, features[:-1])]
        y = features[-1]  # (B, D, H/p, W/p)
        for s in range(self.stages - 1, -1, -1):
            y = self.ups[s](y)  # (B, C_s, H/2^s, W/2^s)
            y = self.fuse[s](torch.cat([y, skips[s]], dim=1))
        return y
