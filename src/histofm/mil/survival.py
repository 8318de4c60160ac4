"""Survival losses for slide-level models: discrete-time NLL and Cox partial likelihood.

A slide has a follow-up time ``t`` and an event indicator ``e`` (1: the event was
observed at ``t``; 0: censored, still event-free at ``t``).

**Discrete-time NLL** (Zadeh & Schmid, TPAMI 2020, arXiv 2008.03744; as in
CLAM-survival / PORPOISE). Time is cut into ``K`` bins at the quantiles of the
observed event times of the training slides; the model gives ``K`` logits, the
hazards ``h_k = sigmoid(logit_k) = P(T = k | T >= k)`` and the survival
``S_k = prod_{j <= k} (1 - h_j)``. For a slide in bin ``y``::

    event:     -log(S_{y-1} h_y)            (survived the bins before, died in bin y)
    censored:  -log(S_y)                    (survived bin y)
    loss = (1 - alpha) * mean(both) + alpha * mean(event term)   with S_{-1} = 1

The risk score (higher = earlier event) is ``-sum_k S_k``, minus the expected
number of bins survived.

**Cox partial likelihood** (Cox 1972; DeepSurv, arXiv 1606.00931). The model gives
one log-risk ``r``; over a batch, with Breslow's handling of tied times::

    loss = -1/n_events * sum_{i: e_i = 1} ( r_i - log sum_{j: t_j >= t_i} exp(r_j) )

It needs several slides per step (``--batch-size``), since the risk set is the batch.
"""

from __future__ import annotations

import numpy as np
import torch

from histofm.errors import HistofmError

LOSSES = ("nll", "cox")


def time_bins(times: np.ndarray, events: np.ndarray, n_bins: int) -> np.ndarray:
    """Inner bin edges ``(n_bins - 1,)``: quantiles of the observed event times."""
    observed = np.asarray(times, dtype=np.float64)[np.asarray(events, dtype=bool)]
    if len(observed) == 0:
        raise HistofmError("The training slides of a fold have no observed event; survival needs some in every fold.")
    return np.quantile(observed, np.linspace(0, 1, n_bins + 1)[1:-1])


def discretize(times: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin index in ``0..len(edges)`` of each time (the last bin is open-ended)."""
    return np.searchsorted(np.asarray(edges), np.asarray(times, dtype=np.float64), side="right")


def nll_loss(logits: torch.Tensor, bins: torch.Tensor, events: torch.Tensor, alpha: float = 0.0,
             eps: float = 1e-7) -> torch.Tensor:
    """Discrete-time survival NLL of hazard logits ``(B, K)`` for bins ``(B,)`` and events ``(B,)``."""
    hazards = torch.sigmoid(logits.float())  # (B, K)
    surv = torch.cumprod(1 - hazards, dim=1)  # S_k, (B, K)
    surv_pad = torch.cat([torch.ones_like(surv[:, :1]), surv], dim=1)  # S_{-1} = 1, (B, K + 1)
    y = bins.long().view(-1, 1)
    e = events.float().view(-1)
    s_before = surv_pad.gather(1, y).squeeze(1).clamp_min(eps)  # S_{y-1}
    h_y = hazards.gather(1, y).squeeze(1).clamp_min(eps)
    s_y = surv_pad.gather(1, y + 1).squeeze(1).clamp_min(eps)  # S_y
    uncensored = -e * (torch.log(s_before) + torch.log(h_y))
    censored = -(1 - e) * torch.log(s_y)
    return (1 - alpha) * (uncensored + censored).mean() + alpha * uncensored.mean()


def cox_loss(risk: torch.Tensor, times: torch.Tensor, events: torch.Tensor) -> torch.Tensor:
    """Negative Cox partial log-likelihood (Breslow ties) of log-risks ``(B,)`` or ``(B, 1)``."""
    r = risk.float().reshape(-1)
    e = events.bool().reshape(-1)
    if not bool(e.any()):
        return r.sum() * 0.0  # no event in the batch: no information, but keep the graph
    at_risk = times.reshape(1, -1) >= times.reshape(-1, 1)  # (B, B): row i, j in the risk set of i
    log_denominator = torch.logsumexp(r.unsqueeze(0).masked_fill(~at_risk, float("-inf")), dim=1)  # (B,)
    return -(r - log_denominator)[e].mean()


def risk_from_logits(logits: torch.Tensor, loss: str) -> torch.Tensor:
    """Risk scores ``(B,)``: ``-sum_k S_k`` for NLL hazards, the log-risk itself for Cox."""
    if loss == "cox":
        return logits.reshape(logits.shape[0], -1)[:, 0]
    surv = torch.cumprod(1 - torch.sigmoid(logits.double()), dim=1)
    return -surv.sum(dim=1)


def survival_curve(logits: torch.Tensor) -> torch.Tensor:
    """``S_k`` per bin ``(B, K)`` from NLL hazard logits."""
    return torch.cumprod(1 - torch.sigmoid(logits.double()), dim=1)


def check_loss(loss: str, batch_size: int) -> None:
    """Refuse an unknown survival loss, or Cox with one slide per step."""
    if loss not in LOSSES:
        raise HistofmError(f"Unknown survival loss {loss!r}; pass --set loss=nll or --set loss=cox.")
    if loss == "cox" and batch_size < 2:
        raise HistofmError("The Cox loss compares slides within a step, so it needs --batch-size 2 or more (16 works well).")

