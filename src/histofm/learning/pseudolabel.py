"""Pseudo-labelling: train on the model's own most likely class for unlabelled images.

Lee 2013, "Pseudo-Label: The Simple and Efficient Semi-Supervised Learning
Method for Deep Neural Networks", ICML 2013 Workshop on Challenges in
Representation Learning (no arXiv version).

Idea: for each unlabelled image take the class the current model finds most
likely as if it were the true label, and add its cross-entropy to the
supervised loss with a weight that ramps up from zero (early predictions are
noise). The paper's weight is::

    L = 1/n sum_m CE(y_m, f(x_m)) + alpha(t) 1/n' sum_m CE(argmax f(u_m), f(u_m))
    alpha(t) = 0 for t < T1;  alpha_f (t - T1) / (T2 - T1) for T1 <= t < T2;  alpha_f after

(``alpha_f = 3``, ``T1 = 100``, ``T2 = 600`` epochs in the paper). Minimising it
is entropy minimisation: it pushes decision boundaries into low-density regions.

Defaults differ from the paper where it fails on small labelled sets: with every
pseudo-label kept (threshold 0) and weight 3, a model trained on 30 labels for a
few hundred steps collapsed to predicting one class in our runs. So by default
only pseudo-labels with confidence >= 0.95 count (the "Pseudo-Label" baseline
of the FixMatch paper), ``alpha_f = 1`` and the ramp spans 30-80 % of training;
``threshold=0, alpha_f=3`` recovers the paper. The target comes from one weak
view (no gradient) and is learnt on another, with BatchNorm on batch
statistics in both forwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from histofm.learning.semi import Classifier, SemiMethod
from histofm.learning.views import ViewConfig, weak_view
from histofm.settings import check_config, setting


@dataclass(frozen=True)
class PseudoLabelConfig:
    """Pseudo-label hyper-parameters (``T1``, ``T2`` as fractions of training).

    Attributes:
        alpha_f: final weight of the unlabelled loss (3 in the paper).
        t1, t2: the ramp runs from ``t1 * steps`` (weight 0) to ``t2 * steps`` (weight ``alpha_f``).
        threshold: minimum confidence of a pseudo-label (0 keeps all, as in the paper).
        views: strengths of the views.
    """

    alpha_f: float = setting(1.0, range=">= 0")
    t1: float = setting(0.3, range="[0, 1]")
    t2: float = setting(0.8, range="[0, 1]")
    threshold: float = setting(0.95, range="[0, 1]")
    views: ViewConfig = ViewConfig()

    def __post_init__(self) -> None:
        check_config(self)



def pseudo_label_weight(step: int, max_steps: int, alpha_f: float, t1: float, t2: float) -> float:
    """Lee's piecewise-linear ramp of the unlabelled weight."""
    a, b = t1 * max_steps, t2 * max_steps
    if step < a:
        return 0.0
    if step >= b or b <= a:
        return alpha_f
    return alpha_f * (step - a) / (b - a)


class PseudoLabel(SemiMethod):
    """Pseudo-labelling around a classifier; outputs ``{"loss", "loss_s", "loss_u", "weight", "mask_rate"}``."""

    def __init__(self, classifier: Classifier, cfg: PseudoLabelConfig = PseudoLabelConfig(), seed: int = 0) -> None:
        super().__init__(classifier, seed=seed)
        self.cfg = cfg
        self.register_buffer("weight", torch.tensor(0.0))  # the ramp's value; a buffer, so checkpoints keep it

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        g = self.generator(batch)
        x_l, y_l, x_u = self.images(batch)
        b, views = x_l.shape[0], self.cfg.views
        logits = self.classifier(torch.cat([self.view(weak_view, x_l, views, g), self.view(weak_view, x_u, views, g)]))
        loss_s = F.cross_entropy(logits[:b].float(), y_l)
        logits_u = logits[b:]
        with torch.no_grad():  # a second weak view gives the target (BatchNorm on batch statistics, as in training)
            conf, pseudo = torch.softmax(self.classifier(self.view(weak_view, x_u, views, g)).float(), -1).max(-1)
            mask = (conf >= self.cfg.threshold).float()
        loss_u = (F.cross_entropy(logits_u.float(), pseudo, reduction="none") * mask).mean()
        out = {"loss": loss_s + self.weight * loss_u, "loss_s": loss_s.detach(), "loss_u": loss_u.detach(),
               "weight": self.weight.clone(), "mask_rate": mask.mean()}
        if "y_u" in batch:
            out["pseudo_acc"] = self.pseudo_label_accuracy(logits_u, batch["y_u"], self.cfg.threshold)
        return out

    @torch.no_grad()
    def on_step_end(self, step: int, max_steps: int) -> None:
        self.weight.fill_(pseudo_label_weight(step + 1, max_steps, self.cfg.alpha_f, self.cfg.t1, self.cfg.t2))
