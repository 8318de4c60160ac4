"""Schedules for learning rate, weight decay, EMA momentum and temperatures.

All are plain functions of the global step, so a resumed run reproduces them exactly.
The cosine schedule is the one of SGDR (Loshchilov & Hutter 2016, arXiv 1608.03983)
without restarts, after an optional linear warm-up::

    v(t) = end + (start - end) * (1 + cos(pi * (t - W) / (T - W))) / 2     for t >= W
    v(t) = warmup_start + (start - warmup_start) * t / W                     for t <  W
"""

from __future__ import annotations

import math


def cosine_schedule(
    step: int,
    max_steps: int,
    start: float,
    end: float,
    warmup_steps: int = 0,
    warmup_start: float = 0.0,
) -> float:
    """Value at ``step`` of a linear warm-up followed by a half-cosine from ``start`` to ``end``.

    Args:
        step: global step, from 0.
        max_steps: total steps; the value reaches ``end`` at ``max_steps`` (and stays there).
        start: value right after warm-up.
        end: final value.
        warmup_steps: length of the linear warm-up.
        warmup_start: value at step 0 when there is a warm-up.
    """
    if step < warmup_steps:
        return warmup_start + (start - warmup_start) * step / warmup_steps
    span = max(max_steps - warmup_steps, 1)
    progress = min(max((step - warmup_steps) / span, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def linear_warmup_constant(step: int, warmup_steps: int, start: float, end: float) -> float:
    """Linear ramp from ``start`` to ``end`` over ``warmup_steps``, then constant ``end``.

    The DINO teacher temperature uses this (0.04 -> 0.07 over the first epochs).
    """
    if warmup_steps <= 0 or step >= warmup_steps:
        return end
    return start + (end - start) * step / warmup_steps


def momentum_schedule(step: int, max_steps: int, base: float = 0.996, final: float = 1.0) -> float:
    """EMA momentum rising from ``base`` to ``final`` on a half cosine (BYOL, DINO, MoCo v3).

    ``m(t) = final - (final - base) * (cos(pi t / T) + 1) / 2``.
    """
    return cosine_schedule(step, max_steps, base, final)


def fixmatch_cosine(step: int, max_steps: int, start: float) -> float:
    """FixMatch's learning rate ``start * cos(7 pi t / (16 T))`` (Sohn et al. 2020, arXiv 2001.07685).

    A quarter-period cosine cut short, so it ends at ``cos(7 pi / 16) = 0.195`` of ``start``
    and stays high for longer than the half cosine.
    """
    return start * math.cos(7 * math.pi * min(step, max_steps) / (16 * max(max_steps, 1)))
