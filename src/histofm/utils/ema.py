"""Exponential moving average of a student's weights: the teacher of MoCo, BYOL, DINO.

``theta_teacher <- m * theta_teacher + (1 - m) * theta_student`` for every parameter;
floating-point buffers (BatchNorm running statistics) are copied the same way.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from histofm.errors import HistofmError


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """Move ``teacher`` towards ``student`` in place: ``t = m * t + (1 - m) * s``.

    Both modules must have the same parameter names (the teacher is usually a deep copy).
    """
    t_params = dict(teacher.named_parameters())
    s_params = dict(student.named_parameters())
    if t_params.keys() != s_params.keys():
        raise HistofmError("The EMA teacher and the student have different parameters; build the teacher with make_teacher(student).")
    names = list(t_params)
    t_list = [t_params[n].data for n in names]
    s_list = [s_params[n].data.to(t_params[n].dtype) for n in names]
    if t_list:
        torch._foreach_lerp_(t_list, s_list, 1.0 - momentum)
    s_bufs = dict(student.named_buffers())
    for name, buf in teacher.named_buffers():
        src = s_bufs.get(name)
        if src is None:
            continue
        if buf.is_floating_point():
            buf.lerp_(src.to(buf.dtype), 1.0 - momentum)
        else:
            buf.copy_(src)


def make_teacher(student: nn.Module) -> nn.Module:
    """A frozen deep copy of ``student`` (no gradients), to be updated with :func:`ema_update`."""
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher
