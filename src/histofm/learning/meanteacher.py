"""Mean Teacher: agree with an exponential moving average of yourself.

Tarvainen & Valpola 2017, "Mean teachers are better role models: Weight-averaged
consistency targets improve semi-supervised deep learning results", arXiv 1703.01780.

Idea: keep a *teacher* whose weights are an exponential moving average (EMA) of
the *student's*. Both see differently augmented (and differently noised) views
of the same image; the student is trained to match the teacher's class
probabilities on every image, labelled or not, besides the usual cross-entropy
on the labelled ones. The EMA teacher is a temporal ensemble, so its targets are
smoother and better than the student's own::

    L       = CE(y, f(x_l; theta)) + w(t) * 1/N sum_i || softmax f(x_i; theta, eta) - softmax f(x_i; theta', eta') ||^2
    theta'_t = a theta'_{t-1} + (1 - a) theta_t
    w(t)    = w_max * exp(-5 (1 - t / T_ramp)^2)   for t < T_ramp, then w_max

The paper uses ``a = 0.99`` during ramp-up and ``0.999`` after, mean squared
error on probabilities (summed over classes, averaged over images) and a
sigmoid-shaped ramp-up of the consistency weight. The teacher (not the student)
is the model evaluated and saved. As in the reference implementation, only
parameters are averaged: the teacher runs in training mode too, so its
BatchNorm normalises with batch statistics and keeps running statistics of its
own (copying the student's would pair averaged weights with statistics of
other weights, which breaks the teacher early in training).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from histofm.learning.semi import Classifier, SemiMethod
from histofm.learning.views import ViewConfig, strong_view, weak_view
from histofm.settings import check_config, setting


@dataclass(frozen=True)
class MeanTeacherConfig:
    """Mean Teacher hyper-parameters.

    Attributes:
        ema: teacher momentum after the ramp-up. The paper's 0.999 suits runs of many thousand
            steps; in a run of a few hundred it freezes the teacher near its early weights.
        ema_rampup: teacher momentum during the ramp-up.
        consistency: maximum consistency weight ``w_max`` (on the class-summed squared error;
            1 did better than 10 in short runs here).
        rampup_frac: fraction of training over which ``w(t)`` and the momentum ramp up.
        strong_student: give the student strong views (the teacher keeps weak views); off by
            default: the paper gives both the same kind of noise, and strong student views
            slowed learning in short runs here.
        views: strengths of the views.
    """

    ema: float = setting(0.99, range="[0, 1]")
    ema_rampup: float = setting(0.99, range="[0, 1]")
    consistency: float = setting(1.0, range=">= 0")
    rampup_frac: float = setting(0.3, range="[0, 1]")
    strong_student: bool = False
    views: ViewConfig = ViewConfig()

    def __post_init__(self) -> None:
        check_config(self)



def sigmoid_rampup(t: float, length: float) -> float:
    """``exp(-5 (1 - t/length)^2)`` for ``t < length``, else 1 (Laine & Aila 2017's ramp)."""
    if length <= 0:
        return 1.0
    p = min(max(t / length, 0.0), 1.0)
    return math.exp(-5.0 * (1.0 - p) ** 2)


def consistency_mse(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Squared distance between softmax outputs, summed over classes, averaged over images."""
    p_s = torch.softmax(student_logits.float(), -1)
    p_t = torch.softmax(teacher_logits.detach().float(), -1)
    return ((p_s - p_t) ** 2).sum(-1).mean()


class MeanTeacher(SemiMethod):
    """Student classifier plus an EMA teacher; ``on_step_end`` updates the teacher.

    Batch and outputs as in :class:`~histofm.learning.fixmatch.FixMatch`; the
    outputs are ``{"loss", "loss_s", "loss_c", "weight", "ema"}``.
    """

    def __init__(self, classifier: Classifier, cfg: MeanTeacherConfig = MeanTeacherConfig(), seed: int = 0) -> None:
        super().__init__(classifier, seed=seed)
        self.cfg = cfg
        self.teacher = copy.deepcopy(classifier)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        # Schedule state set in on_step_end; buffers, so that the engine's checkpoint keeps them.
        self.register_buffer("weight", torch.tensor(sigmoid_rampup(0, 1) * cfg.consistency))
        self.register_buffer("momentum", torch.tensor(cfg.ema_rampup))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        g = self.generator(batch)
        x_l, y_l, x_u = self.images(batch)
        b = x_l.shape[0]
        x = torch.cat([x_l, x_u])  # consistency on every image, labelled ones included
        student_view = strong_view if self.cfg.strong_student else weak_view
        logits_s = self.classifier(self.view(student_view, x, self.cfg.views, g))  # (B + muB, C)
        with torch.no_grad():
            logits_t = self.teacher(self.view(weak_view, x, self.cfg.views, g))
        loss_s = F.cross_entropy(logits_s[:b].float(), y_l)
        loss_c = consistency_mse(logits_s, logits_t)
        out = {"loss": loss_s + self.weight * loss_c, "loss_s": loss_s.detach(), "loss_c": loss_c.detach(),
               "weight": self.weight.clone(), "ema": self.momentum.clone()}
        if "y_u" in batch:
            out["pseudo_acc"] = self.pseudo_label_accuracy(logits_t[b:], batch["y_u"], 0.0)
        return out

    @torch.no_grad()
    def on_step_end(self, step: int, max_steps: int) -> None:
        ramp = self.cfg.rampup_frac * max_steps
        momentum = self.cfg.ema_rampup if step + 1 < ramp else self.cfg.ema
        # Early on, average with 1 - 1/(step + 2) (a plain running mean) so the teacher forgets its random init.
        a = min(momentum, 1.0 - 1.0 / (step + 2))
        for pt, ps in zip(self.teacher.parameters(), self.classifier.parameters()):
            pt.mul_(a).add_(ps.detach(), alpha=1 - a)
        self.momentum.fill_(momentum)
        self.weight.fill_(self.cfg.consistency * sigmoid_rampup(step + 1, ramp))

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.teacher(x)

    def deployed(self) -> Classifier:
        return self.teacher

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.teacher.forward_features(x)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.classifier.parameters())
