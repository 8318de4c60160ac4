"""DSMIL: dual-stream MIL (Li, Li & Eliceiri, CVPR 2021, arXiv 2011.08939).

Two streams over the projected tiles ``h_n``:

1. an instance classifier ``c_n = W_0 h_n`` whose max over tiles is a max-pooling
   bag score; the arg-max tile of each class ``c`` is that class's *critical instance* ``m_c``.
   With two classes there is one critical instance, the most positive tile
   ``argmax_n (c_{n,1} - c_{n,0})``, and the max stream is its logits: the paper's binary
   DSMIL (one logit per tile) written with two. A per-class max would make the most
   negative-looking tile the negative class's critical instance, and a positive bag is mostly
   such tiles (see :mod:`histofm.mil.pooling`);
2. attention of every tile to the critical instance, in a learned query space::

       q_n = tanh(W_q2 ReLU(W_q1 h_n)),  U_{n,c} = softmax_n(<q_n, q_{m_c}> / sqrt(d_q))
       b_c = sum_n U_{n,c} v_n,           bag score_c = Conv1d(b)_c

The bag score is the average of the two streams (the paper's prediction), and
each stream is also supervised on its own during training: when ``labels`` are
given, ``aux_loss = (CE(max stream) + CE(bag stream)) / 2``. The per-tile score
is ``U_{n, pred}``, the attention to the critical instance of the predicted class.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from histofm.mil.base import MILAggregator, MILOutput, dropout_layer, masked_softmax, register_aggregator


@register_aggregator("dsmil")
class DSMIL(MILAggregator):
    """Dual-stream MIL.

    Args:
        in_dim: tile embedding size.
        num_classes: number of slide classes.
        hidden_dim: size of the projected tile embedding ``h_n``.
        query_dim: size of the query space ``q_n``.
        dropout: dropout on ``h_n`` and before the value projection.
    """

    def __init__(
        self, in_dim: int, num_classes: int, hidden_dim: int = 256, query_dim: int = 128, dropout: float = 0.25
    ) -> None:
        super().__init__(in_dim, num_classes)
        self.fc = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), dropout_layer(dropout))
        self.instance_classifier = nn.Linear(hidden_dim, num_classes)
        self.query = nn.Sequential(
            nn.Linear(hidden_dim, query_dim), nn.ReLU(), nn.Linear(query_dim, query_dim), nn.Tanh()
        )
        self.value = nn.Sequential(dropout_layer(dropout), nn.Linear(hidden_dim, hidden_dim), nn.ReLU())
        self.bag_classifier = nn.Conv1d(num_classes, num_classes, kernel_size=hidden_dim)
        self.query_dim = query_dim

    def forward(
        self, features: torch.Tensor, mask: torch.Tensor | None = None, *, labels: torch.Tensor | None = None
    ) -> MILOutput:
        x, mask = self.check_inputs(features, mask)
        h = self.fc(x)  # (B, N, H)
        raw = self.instance_classifier(h)  # (B, N, C)
        if self.num_classes == 2:
            margin = (raw[..., 1] - raw[..., 0]).masked_fill(~mask, float("-inf"))  # (B, N) tile log-odds
            top = margin.argmax(dim=1)  # (B,) the one critical tile
            max_logits = raw.gather(1, top.view(-1, 1, 1).expand(-1, 1, 2)).squeeze(1)  # (B, 2)
            critical = top.unsqueeze(1).expand(-1, 2)  # (B, C)
        else:
            inst = raw.masked_fill(~mask.unsqueeze(-1), float("-inf"))
            max_logits, critical = inst.max(dim=1)  # (B, C), (B, C) index of each class's critical tile
        q = self.query(h)  # (B, N, Dq)
        q_crit = q.gather(1, critical.unsqueeze(-1).expand(-1, -1, q.shape[-1]))  # (B, C, Dq)
        u = masked_softmax(q @ q_crit.transpose(1, 2) / self.query_dim**0.5, mask.unsqueeze(-1), dim=1)  # (B, N, C)
        bag = u.transpose(1, 2) @ self.value(h)  # (B, C, H)
        bag_logits = self.bag_classifier(bag).squeeze(-1)  # (B, C)
        logits = 0.5 * (max_logits + bag_logits)
        pred = logits.argmax(-1)
        scores = u.gather(-1, pred.view(-1, 1, 1).expand(-1, u.shape[1], 1)).squeeze(-1)  # (B, N)
        aux = None
        if labels is not None:
            aux = 0.5 * (F.cross_entropy(max_logits, labels) + F.cross_entropy(bag_logits, labels))
        return MILOutput(logits=logits, scores=scores, aux_loss=aux)
