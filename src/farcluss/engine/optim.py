"""The optimizer (SGD or AdamW) with a head learning-rate multiplier, and the poly schedule."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

OPTIMIZERS = ("sgd", "adamw")


def build_optimizer(model: nn.Module, lr: float, head_lr_multiplier: float, momentum: float,
                    weight_decay: float, optimizer: str = "sgd",
                    betas: Sequence[float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    """Two groups: the backbone at `lr`, everything else (ASPP/DPT decoder, heads) at
    lr × multiplier.

    Only parameters that need a gradient join: a frozen backbone (`models.freeze_backbone`)
    leaves group 0 empty, so the optimizer holds no state for it and a checkpoint none either.
    ``sgd``: momentum SGD with L2 weight decay; ``adamw``: AdamW (decoupled weight decay on
    every parameter, as UniMatch V2)."""
    backbone_params, head_params = model.parameter_groups()
    groups = [
        {"params": [p for p in backbone_params if p.requires_grad], "lr": lr, "base_lr": lr},
        {"params": [p for p in head_params if p.requires_grad], "lr": lr * head_lr_multiplier,
         "base_lr": lr * head_lr_multiplier},
    ]
    if optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")


def poly_factor(iteration: int, total: int, power: float) -> float:
    """lr_t = lr_0 · (1 − t/T)^power."""
    return (1.0 - min(iteration, total) / total) ** power


def set_poly_lr(optimizer: torch.optim.Optimizer, iteration: int, total: int, power: float) -> float:
    factor = poly_factor(iteration, total, power)
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
    return optimizer.param_groups[0]["lr"]
