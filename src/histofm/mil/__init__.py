"""Multiple-instance learning: slide-level aggregators over tile embeddings, training and heatmaps.

>>> from histofm.mil import build_aggregator, list_aggregators
>>> agg = build_aggregator("abmil", in_dim=384, num_classes=2)
"""

from histofm.mil.base import (
    MILAggregator,
    MILOutput,
    build_aggregator,
    list_aggregators,
    masked_mean,
    masked_softmax,
    register_aggregator,
)

__all__ = [
    "MILAggregator",
    "MILOutput",
    "build_aggregator",
    "list_aggregators",
    "masked_mean",
    "masked_softmax",
    "register_aggregator",
]
