"""Constants shared across floors (floor 1: imports nothing from histofm)."""

from __future__ import annotations

# ImageNet channel statistics (RGB, in [0, 1]): the normalisation most encoders were trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
