"""Helpers shared by the vendor modules of the zoo."""

from __future__ import annotations

from typing import Any

from histofm._registry import ModelInfo
from histofm.models.vit import VisionTransformer


def build_vit(info: ModelInfo, overrides: dict[str, Any]) -> VisionTransformer:
    """``VisionTransformer(**info.arch_kwargs)`` with ``overrides`` replacing registered values."""
    return VisionTransformer(**{**info.arch_kwargs, **overrides})


def arxiv(paper_id: str) -> str:
    """The house spelling of an arXiv reference (``"arXiv 2309.07778"``)."""
    return f"arXiv {paper_id}"
