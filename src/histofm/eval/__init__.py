"""Frozen-feature evaluation: kNN, linear probe, few-shot, metrics, dataset readers and the nuclei task.

>>> from histofm.eval import knn_predict, linear_probe, fewshot_episodes, summarize
"""

from histofm.eval.fewshot import fewshot_episodes, simpleshot_scores
from histofm.eval.knn import knn_predict
from histofm.eval.linear import LinearProbeResult, linear_probe
from histofm.eval.metrics import (
    MetricSummary,
    auroc,
    balanced_accuracy,
    bootstrap_ci,
    classification_metrics,
    macro_f1,
    summarize,
)

__all__ = [
    "LinearProbeResult",
    "MetricSummary",
    "auroc",
    "balanced_accuracy",
    "bootstrap_ci",
    "classification_metrics",
    "fewshot_episodes",
    "knn_predict",
    "linear_probe",
    "macro_f1",
    "simpleshot_scores",
    "summarize",
]
