"""Learning beyond self-supervision: semi-supervised methods and unsupervised clustering.

Semi-supervised (few labels, many unlabelled tiles): :mod:`~histofm.learning.fixmatch`,
:mod:`~histofm.learning.meanteacher`, :mod:`~histofm.learning.pseudolabel`, the shared
pieces (classifier, step batches, evaluation) in :mod:`~histofm.learning.semi`; they train
through the one engine (:func:`histofm.train.semi.fit_semi`). Unsupervised (no labels): k-means, prototypes,
NMI/ARI in :mod:`~histofm.learning.unsupervised`; tissue-phenotype maps of a slide in
:mod:`~histofm.learning.cluster_map`.
"""

from __future__ import annotations

from typing import Any

from histofm.errors import HistofmError

SEMI_METHODS = ("fixmatch", "meanteacher", "pseudolabel", "supervised")


def build_semi_method(name: str, classifier: Any, seed: int = 0, **config: Any) -> Any:
    """Build a semi-supervised method by name around ``classifier``.

    ``config`` overrides fields of the method's config dataclass (a misspelt
    field raises :class:`HistofmError`).
    """
    import dataclasses

    from histofm.learning.fixmatch import FixMatch, FixMatchConfig
    from histofm.learning.meanteacher import MeanTeacher, MeanTeacherConfig
    from histofm.learning.pseudolabel import PseudoLabel, PseudoLabelConfig
    from histofm.learning.semi import Supervised

    if name == "supervised":
        return Supervised(classifier, seed=seed, **config)
    table = {"fixmatch": (FixMatch, FixMatchConfig), "meanteacher": (MeanTeacher, MeanTeacherConfig),
             "pseudolabel": (PseudoLabel, PseudoLabelConfig)}
    if name not in table:
        raise HistofmError(f"Unknown semi-supervised method {name!r}; choose one of {', '.join(SEMI_METHODS)}.")
    cls, cfg_cls = table[name]
    try:
        cfg = dataclasses.replace(cfg_cls(), **config)
    except TypeError as e:
        raise HistofmError(f"Bad option for {name}: {e}.") from None
    return cls(classifier, cfg, seed=seed)


__all__ = ["SEMI_METHODS", "build_semi_method"]
