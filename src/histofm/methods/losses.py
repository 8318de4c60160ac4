"""The named losses of the self-distillation family: DINO, iBOT, KoLeo and Virchow2's KDE.

DINO, iBOT, DINOv2, Virchow2 and PLUTO are different sums of these terms (see each
method file). Every loss is a small module, usable alone, with the paper's equation
in its docstring, and computed in float32 under autocast.

* :class:`DINOLoss`, the class-token loss of DINO (Caron et al. 2021, arXiv 2104.14294, Eq. 3);
* :class:`IBOTPatchLoss`, the masked patch-token loss of iBOT (Zhou et al. 2021, arXiv 2111.07832, Eq. 2);
* :class:`KoLeoLoss`, the Kozachenko-Leonenko entropy regulariser of DINOv2
  (Sablayrolles et al. 2019, arXiv 1806.03198);
* :class:`KDEUniformityLoss`, Virchow2's kernel-density regulariser (Zimmermann et al. 2024,
  arXiv 2408.00738).

Both distillation losses turn teacher logits ``t`` into targets in one of two ways
(:class:`TeacherCentering`): the running-mean CENTER of DINO, ``softmax((t - c) / tau_t)``
with ``c`` an EMA of the teacher's mean output, or the SINKHORN-KNOPP balancing of SwAV
(Caron et al. 2020, arXiv 2006.09882) that DINOv2 uses, :func:`sinkhorn_knopp`. Both
keep one prototype from winning every sample (collapse); the low teacher temperature
``tau_t`` (:func:`teacher_temperature`) keeps the targets from going uniform.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from histofm.errors import HistofmError
from histofm.utils.distributed import all_reduce_mean, is_distributed, world_size
from histofm.utils.schedules import linear_warmup_constant

Centering = Literal["centering", "sinkhorn"]


# ------------------------------------------------------------------ teacher targets
def teacher_temperature(step: int, max_steps: int, warmup_temp: float, temp: float, warmup_fraction: float) -> float:
    """``tau_t`` at ``step``: linear from ``warmup_temp`` to ``temp`` over ``warmup_fraction`` of the run, then flat.

    Before the engine has reported the run length (``max_steps == 0``) this is the start of the warm-up.
    """
    if max_steps == 0:
        return warmup_temp if warmup_fraction > 0 else temp
    return linear_warmup_constant(step, int(round(warmup_fraction * max_steps)), warmup_temp, temp)


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, teacher_temp: float, n_iterations: int = 3) -> torch.Tensor:
    """Balanced soft assignments ``(B, K)`` of teacher logits ``(B, K)`` (rows sum to 1).

    ``Q = exp(t / tau)^T`` is normalised to total mass 1, then ``n_iterations`` times
    each prototype's row is scaled to mass ``1 / K`` and each sample's column to mass
    ``1 / B``; the result is rescaled so every sample's distribution sums to 1. Under
    ``torchrun`` the sums run over all ranks. Computed in float32.
    """
    with torch.autocast(teacher_logits.device.type, enabled=False):
        logits = teacher_logits.float() / teacher_temp
        logits = logits - logits.max()  # a global shift cancels in the normalisation
        q = torch.exp(logits).t()  # (K, B)
        n_samples = q.shape[1] * world_size()
        n_protos = q.shape[0]
        total = q.sum()
        if is_distributed():
            torch.distributed.all_reduce(total)
        q = q / total
        for _ in range(n_iterations):
            rows = q.sum(dim=1, keepdim=True)  # (K, 1)
            if is_distributed():
                torch.distributed.all_reduce(rows)
            q = q / rows / n_protos
            q = q / q.sum(dim=0, keepdim=True) / n_samples  # columns: one per sample
        return (q * n_samples).t()  # (B, K)


class TeacherCentering(nn.Module):
    """Teacher logits ``(..., K)`` to target distributions, by a running-mean center or Sinkhorn-Knopp.

    ``"centering"``: ``P_t = softmax((t - c) / tau_t)`` and, after the loss,
    ``c <- m c + (1 - m) mean(t)`` over every row on every rank. ``"sinkhorn"``:
    :func:`sinkhorn_knopp` over the rows of the batch; ``c`` is kept (and stays 0) so both
    modes have the same state.

    Args:
        out_dim: number of prototypes ``K``.
        center_momentum: EMA momentum ``m`` of the center (0.9).
        centering: ``"centering"`` (DINO, iBOT) or ``"sinkhorn"`` (DINOv2).
        sinkhorn_iterations: Sinkhorn-Knopp iterations (3).
    """

    center: torch.Tensor

    def __init__(
        self, out_dim: int, center_momentum: float = 0.9, centering: Centering = "centering", sinkhorn_iterations: int = 3
    ) -> None:
        super().__init__()
        if centering not in ("centering", "sinkhorn"):
            raise HistofmError(f"centering must be 'centering' or 'sinkhorn', not {centering!r}; change centering.")
        self.center_momentum = center_momentum
        self.centering = centering
        self.sinkhorn_iterations = sinkhorn_iterations
        self.register_buffer("center", torch.zeros(1, out_dim))

    @torch.no_grad()
    def teacher_probs(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """Targets ``(..., K)`` of teacher logits ``(..., K)`` (float32; the center is not updated here).

        Sinkhorn-Knopp balances over all rows of the batch together (every leading dimension).
        """
        if self.centering == "sinkhorn":
            rows = teacher_logits.reshape(-1, teacher_logits.shape[-1])  # (N, K)
            if rows.shape[0] == 0:  # e.g. nothing was masked in this batch
                return teacher_logits.float()
            return sinkhorn_knopp(rows, teacher_temp, self.sinkhorn_iterations).view(teacher_logits.shape)
        with torch.autocast(teacher_logits.device.type, enabled=False):
            return F.softmax((teacher_logits.float() - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        """``c <- m c + (1 - m) mean(t)`` over every row (all ranks); no rows or Sinkhorn: no change."""
        if self.centering == "sinkhorn":
            return
        rows = teacher_logits.float().reshape(-1, teacher_logits.shape[-1])
        if rows.shape[0] == 0:
            return
        batch_center = all_reduce_mean(rows.mean(dim=0))
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1.0 - self.center_momentum)


# ------------------------------------------------------------------ DINO
def cross_entropy_terms(student_logits: torch.Tensor, teacher_probs: torch.Tensor, student_temp: float) -> torch.Tensor:
    """Matrix of mean cross-entropies ``H(P_t[i], P_s[j])`` over the batch, ``(T, S)``.

    Args:
        student_logits: ``(S, B, K)`` raw student logits of ``S`` views.
        teacher_probs: ``(T, B, K)`` teacher target distributions of ``T`` views.
        student_temp: ``tau_s``.

    Uses ``H(q, softmax(z)) = sum_k q_k * logsumexp(z) - q . z`` so the student's
    log-softmax over ``K`` is never materialised (one matmul instead). Computed in float32.
    """
    with torch.autocast(student_logits.device.type, enabled=False):
        z = student_logits.float() / student_temp  # (S, B, K)
        q = teacher_probs.float()  # (T, B, K)
        lse = torch.logsumexp(z, dim=-1)  # (S, B)
        dots = torch.einsum("tbk,sbk->ts", q, z)  # (T, S): sum over batch and prototypes
        mass = torch.einsum("tb,sb->ts", q.sum(dim=-1), lse)  # (T, S); q sums to 1 per row
        return (mass - dots) / z.shape[1]


def dino_cross_entropy(student_logits: torch.Tensor, teacher_probs: torch.Tensor, student_temp: float) -> torch.Tensor:
    """DINO's loss: mean of :func:`cross_entropy_terms` over pairs of DIFFERENT views.

    View ``i`` of the teacher and view ``i`` of the student are the same crop (the
    global crops come first in both lists), so the diagonal is skipped.
    """
    terms = cross_entropy_terms(student_logits, teacher_probs, student_temp)  # (T, S)
    n_t, n_s = terms.shape
    same = torch.eye(n_t, n_s, dtype=torch.bool, device=terms.device)
    n_terms = n_t * n_s - min(n_t, n_s)
    if n_terms == 0:
        raise HistofmError("DINO's loss needs at least two crops per image; add global or local crops.")
    return terms.masked_fill(same, 0.0).sum() / n_terms


def _stack(views: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    return views if isinstance(views, torch.Tensor) else torch.stack(list(views))


class DINOLoss(TeacherCentering):
    """DINO's class-token loss over pairs of different crops (Eq. 3 of arXiv 2104.14294).

    With ``P_t = targets(g_t(x))`` (centred or Sinkhorn, temperature ``tau_t``) and
    ``P_s = softmax(g_s(x') / tau_s)``::

        L = mean over pairs (x in global crops, x' in all crops, x' != x) of  H(P_t(x), P_s(x'))
        H(a, b) = - sum_k a_k log b_k

    Args:
        out_dim: number of prototypes ``K``.
        student_temp: ``tau_s`` (0.1).
        center_momentum, centering, sinkhorn_iterations: those of :class:`TeacherCentering`.
    """

    def __init__(
        self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9,
        centering: Centering = "centering", sinkhorn_iterations: int = 3,
    ) -> None:
        super().__init__(out_dim, center_momentum, centering, sinkhorn_iterations)
        self.student_temp = student_temp

    def forward(
        self,
        student_logits: torch.Tensor | Sequence[torch.Tensor],
        teacher_logits: torch.Tensor | Sequence[torch.Tensor],
        teacher_temp: float,
    ) -> torch.Tensor:
        """Loss over views; updates the center afterwards.

        Args:
            student_logits: ``S`` views of ``(B, K)`` (or a ``(S, B, K)`` tensor), global crops first.
            teacher_logits: ``T`` global views of ``(B, K)`` (or ``(T, B, K)``).
            teacher_temp: ``tau_t`` for this step.
        """
        s, t = _stack(student_logits), _stack(teacher_logits).detach()
        K = self.center.shape[-1]
        if s.shape[-1] != K or t.shape[-1] != K or s.shape[-2] != t.shape[-2]:
            raise HistofmError(f"DINOLoss(out_dim={K}) needs student and teacher logits (views, B, {K}) with the same "
                               f"B; got {tuple(s.shape)} and {tuple(t.shape)}: match out_dim to the heads' output.")
        loss = dino_cross_entropy(s, self.teacher_probs(t, teacher_temp), self.student_temp)
        self.update_center(t)
        return loss


# ------------------------------------------------------------------ iBOT
def ibot_cross_entropy(
    student_logits: torch.Tensor, teacher_probs: torch.Tensor, masks: torch.Tensor, student_temp: float
) -> torch.Tensor:
    """Masked-patch cross-entropy, averaged over masked patches per image, then over ALL images.

    Args:
        student_logits: ``(M, K)`` student logits of the masked patches (image-major order).
        teacher_probs: ``(M, K)`` teacher targets of the same patches.
        masks: ``(B, gh, gw)`` or ``(B, N)`` bool masks; ``M = masks.sum()``. Images without
            a mask count in ``B`` (they contribute 0).
        student_temp: ``tau_s``.
    """
    m = masks.reshape(masks.shape[0], -1)  # (B, N)
    with torch.autocast(student_logits.device.type, enabled=False):
        z = student_logits.float() / student_temp  # (M, K)
        q = teacher_probs.float()
        ce = torch.logsumexp(z, dim=-1) * q.sum(dim=-1) - (q * z).sum(dim=-1)  # (M,)
        weight = (1.0 / m.sum(dim=1).clamp(min=1).float()).unsqueeze(1).expand_as(m)[m]  # (M,)
        return (ce * weight).sum() / m.shape[0]


class IBOTPatchLoss(TeacherCentering):
    """iBOT's masked patch-token loss (Eq. 2 of arXiv 2111.07832).

    For each masked patch ``i`` of image ``b`` the student, who saw a mask token there,
    must predict the teacher's distribution over ``K`` patch prototypes for the unmasked patch::

        L_MIM = - mean over images b of  (1 / |M_b|) sum_{i in M_b} P_t(u_i)^T log P_s(u^_i)

    Images without a mask count in the mean (they contribute 0). The center (``"centering"``)
    is updated with the teacher logits of the masked patches, as DINOv2 and lightly do (iBOT's
    own code averages all teacher patch tokens).

    Args: those of :class:`DINOLoss` (``out_dim``: number of patch prototypes).
    """

    def __init__(
        self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9,
        centering: Centering = "centering", sinkhorn_iterations: int = 3,
    ) -> None:
        super().__init__(out_dim, center_momentum, centering, sinkhorn_iterations)
        self.student_temp = student_temp

    def forward(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, masks: torch.Tensor, teacher_temp: float
    ) -> torch.Tensor:
        """Loss on masked patches ``(M, K)`` given masks ``(B, gh, gw)``; updates the center."""
        t = teacher_logits.detach()
        loss = ibot_cross_entropy(student_logits, self.teacher_probs(t, teacher_temp), masks, self.student_temp)
        self.update_center(t)
        return loss


# ------------------------------------------------------------------ regularisers
class KoLeoLoss(nn.Module):
    """Kozachenko-Leonenko differential-entropy regulariser (DINOv2, weight 0.1)::

        L_koleo = - (1 / n) sum_i log(d_{n,i}),   d_{n,i} = min_{j != i} || x_i - x_j ||

    Inputs ``(n, D)`` are L2-normalised first. Pushes each point away from its nearest neighbour.

    Args:
        eps: added to the distances (and used in the normalisation).
    """

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] < 2:
            raise HistofmError("KoLeo needs at least two samples per batch; increase the batch size.")
        with torch.autocast(x.device.type, enabled=False):
            x = F.normalize(x.float(), dim=-1, eps=self.eps)  # (n, D)
            with torch.no_grad():
                sim = x @ x.t()  # (n, n) cosine
                sim.fill_diagonal_(-2.0)
                nearest = sim.argmax(dim=1)  # (n,)
            dist = (x - x[nearest]).norm(dim=-1)  # (n,)
            return -torch.log(dist + self.eps).mean()


class KDEUniformityLoss(nn.Module):
    """Virchow2's kernel-density regulariser: mean log leave-one-out density (von Mises-Fisher kernel)::

        L_kde = (1 / n) sum_i log( (1 / (n - 1)) sum_{j != i} exp(kappa * cos(x_i, x_j)) )

    This is Wang & Isola's uniformity loss (arXiv 2005.10242) with ``kappa = 2 t``.
    MINIMISING it lowers the estimated density at every point, so points spread out. One
    public implementation minimises ``-mean log density`` instead, which PULLS points
    together; the sign here is the spreading one (``tests/test_dinov2.py`` proves it by
    gradient descent on a clustered set). Virchow2's exact form and weight are not public [U].

    Args:
        kappa: kernel concentration (5.0).
    """

    def __init__(self, kappa: float = 5.0) -> None:
        super().__init__()
        self.kappa = kappa

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if n < 2:
            raise HistofmError("The KDE regulariser needs at least two samples per batch; increase the batch size.")
        with torch.autocast(x.device.type, enabled=False):
            x = F.normalize(x.float(), dim=-1, eps=1e-8)
            logits = self.kappa * (x @ x.t())  # (n, n)
            self_pairs = torch.eye(n, dtype=torch.bool, device=x.device)
            log_density = torch.logsumexp(logits.masked_fill(self_pairs, float("-inf")), dim=1) - math.log(n - 1)
            return log_density.mean()
