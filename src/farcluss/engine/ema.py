"""The mean teacher: an exponential moving average of the student (docs/method.md §0)."""

from __future__ import annotations

import copy

import torch
from torch import nn


def ema_momentum(step: int, momentum: float) -> float:
    """m_t = min(1 − 1/(t+1), m): early steps follow the student closely (t counts EMA updates)."""
    return min(1.0 - 1.0 / (step + 1), momentum)


def make_teacher(student: nn.Module) -> nn.Module:
    """A detached copy of the student, in eval mode, that never receives gradients."""
    teacher = copy.deepcopy(student)
    for param in teacher.parameters():
        param.requires_grad_(False)
    teacher.eval()
    return teacher


@torch.no_grad()
def copy_into_teacher(teacher: nn.Module, student: nn.Module) -> None:
    """Re-initialise the teacher from the student (the end of a supervised warm-up)."""
    teacher.load_state_dict(student.state_dict())


@torch.no_grad()
def update_teacher(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """ξ ← m·ξ + (1 − m)·θ over parameters and floating-point buffers (BN running statistics).

    Integer buffers (BN's num_batches_tracked) are copied: an average of counters means nothing.
    """
    for t_param, s_param in zip(teacher.parameters(), student.parameters(), strict=True):
        t_param.lerp_(s_param.detach(), 1.0 - momentum)
    for t_buf, s_buf in zip(teacher.buffers(), student.buffers(), strict=True):
        if t_buf.dtype.is_floating_point:
            t_buf.lerp_(s_buf, 1.0 - momentum)
        else:
            t_buf.copy_(s_buf)
