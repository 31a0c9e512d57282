"""SGD with a head learning-rate multiplier and the poly schedule."""

from __future__ import annotations

import torch
from torch import nn


def build_optimizer(model: nn.Module, lr: float, head_lr_multiplier: float, momentum: float,
                    weight_decay: float) -> torch.optim.SGD:
    """Two groups: the backbone at `lr`, everything else (ASPP, decoder, heads) at lr × multiplier."""
    backbone_params, head_params = model.parameter_groups()
    groups = [
        {"params": backbone_params, "lr": lr, "base_lr": lr},
        {"params": head_params, "lr": lr * head_lr_multiplier, "base_lr": lr * head_lr_multiplier},
    ]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)


def poly_factor(iteration: int, total: int, power: float) -> float:
    """lr_t = lr_0 · (1 − t/T)^power."""
    return (1.0 - min(iteration, total) / total) ** power


def set_poly_lr(optimizer: torch.optim.Optimizer, iteration: int, total: int, power: float) -> float:
    factor = poly_factor(iteration, total, power)
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
    return optimizer.param_groups[0]["lr"]
