"""FixMatch: consistency between a weak and a strong view, gated by confidence.

Sohn et al. 2020, "FixMatch: Simplifying Semi-Supervised Learning with
Consistency and Confidence", arXiv 2001.07685.

Idea: for an unlabelled image, the model's prediction on a *weakly* augmented
view is turned into a hard pseudo-label if it is confident enough; the model is
then trained to predict that label from a *strongly* augmented view of the same
image. Labelled images get the ordinary cross-entropy on a weak view. With
``B`` labelled and ``mu * B`` unlabelled images per step::

    L   = L_s + lambda_u L_u
    L_s = 1/B      sum_b H(y_b, p(y | alpha(x_b)))
    L_u = 1/(mu B) sum_b 1[max q_b >= tau] H(argmax q_b, p(y | A(u_b))),   q_b = p(y | alpha(u_b))

``alpha`` is the weak view, ``A`` the strong one (here the pathology-safe views
of :mod:`histofm.learning.views`), ``tau = 0.95``, ``lambda_u = 1``, ``mu = 7``
in the paper. The pseudo-label is computed without gradient. Note that the
unlabelled loss is averaged over *all* ``mu B`` images, masked ones included, so
its weight grows as the model becomes confident (a built-in curriculum).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from histofm.learning.semi import SemiMethod
from histofm.learning.views import ViewConfig, strong_view, weak_view
from histofm.settings import check_config, setting


@dataclass(frozen=True)
class FixMatchConfig:
    """FixMatch hyper-parameters (paper defaults except where the comment says otherwise).

    Attributes:
        threshold: confidence ``tau`` a weak-view prediction needs to become a pseudo-label.
        lambda_u: weight of the unlabelled loss.
        temperature: temperature of the weak-view softmax (1 in the paper).
        views: strengths of the weak and strong views.
    """

    threshold: float = setting(0.95, range="[0, 1]")
    lambda_u: float = setting(1.0, range=">= 0")
    temperature: float = setting(1.0, range="> 0")
    views: ViewConfig = ViewConfig()

    def __post_init__(self) -> None:
        check_config(self)



def fixmatch_unlabelled_loss(
    logits_weak: torch.Tensor, logits_strong: torch.Tensor, threshold: float, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``L_u`` of FixMatch and the fraction of images above the threshold.

    Args:
        logits_weak: ``(N, C)`` logits of the weak views (detached inside).
        logits_strong: ``(N, C)`` logits of the strong views of the same images.
        threshold: confidence ``tau``.
        temperature: softmax temperature for the weak-view probabilities.

    Returns:
        ``(loss, mask_rate)``; the loss is averaged over all ``N`` images.
    """
    with torch.no_grad():
        q = torch.softmax(logits_weak.detach().float() / temperature, dim=-1)  # (N, C)
        conf, pseudo = q.max(dim=-1)
        mask = (conf >= threshold).float()  # (N,)
    per_image = F.cross_entropy(logits_strong.float(), pseudo, reduction="none")  # (N,)
    return (per_image * mask).mean(), mask.mean()


class FixMatch(SemiMethod):
    """FixMatch around a classifier ``(B, 3, H, W) in [0, 1] -> (B, C)`` logits.

    ``forward(batch)`` takes ``{"x_l": (B,3,H,W), "y_l": (B,), "x_u": (muB,3,H,W)}``
    (raw images, ``uint8`` or in ``[0, 1]``; the views are made here, on the batch's device)
    and returns ``{"loss", "loss_s", "loss_u", "mask_rate", "pseudo_acc"?}``.
    """

    def __init__(self, classifier: nn.Module, cfg: FixMatchConfig = FixMatchConfig(), seed: int = 0) -> None:
        super().__init__(classifier, seed=seed)
        self.cfg = cfg

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        g = self.generator(batch)
        x_l, y_l, x_u = self.images(batch)
        b, views = x_l.shape[0], self.cfg.views
        with torch.no_grad():  # the pseudo-label needs no gradient: a separate forward saves its backward
            logits_uw = self.classifier(self.view(weak_view, x_u, views, g))  # (muB, C)
        logits = self.classifier(torch.cat([self.view(weak_view, x_l, views, g), self.view(strong_view, x_u, views, g)]))
        logits_l, logits_us = logits[:b], logits[b:]
        loss_s = F.cross_entropy(logits_l.float(), y_l)
        loss_u, mask_rate = fixmatch_unlabelled_loss(logits_uw, logits_us, self.cfg.threshold, self.cfg.temperature)
        out = {"loss": loss_s + self.cfg.lambda_u * loss_u, "loss_s": loss_s.detach(),
               "loss_u": loss_u.detach(), "mask_rate": mask_rate}
        if "y_u" in batch:  # oracle labels of the unlabelled images, for monitoring only
            out["pseudo_acc"] = self.pseudo_label_accuracy(logits_uw, batch["y_u"], self.cfg.threshold)
        return out
