"""The pathology foundation-model zoo: one module per vendor, plus ``generic`` (timm's ViT names, no weights).

Importing this package registers every zoo entry (``histofm.list_models()``
imports it lazily). Each entry carries a :class:`~histofm.registry.ModelInfo`
(architecture, embedding recipe, preprocessing, hub id, licence, paper, training
recipe) and, where the hub layout differs from ours, a checkpoint filter.
"""

from histofm.zoo import (  # noqa: F401  (imported for their @register_model side effect)
    bioptimus,
    generic,
    histai,
    kaiko,
    lunit,
    mahmood,
    microsoft,
    owkin,
    paige,
    pluto,
    rudolfv,
    titan,
    vl,
)
from histofm.zoo.table import zoo_markdown_table, zoo_models, zoo_rows

__all__ = ["zoo_markdown_table", "zoo_models", "zoo_rows"]
