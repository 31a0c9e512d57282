"""Adaptive class rebalancing from pseudo-label frequencies (docs/method.md §3)."""

from __future__ import annotations

from typing import Callable

import torch

Reduce = Callable[[torch.Tensor], torch.Tensor]


def class_counts(
    pseudo_labels: torch.Tensor,
    valid_mask: torch.Tensor,
    num_classes: int,
    reduce: Reduce | None = None,
) -> torch.Tensor:
    """Number of valid pixels per hard pseudo-label, summed over the global batch.

        n_c = Σ_ranks |{x valid : argmax q(x) = c}|

    Args:
        pseudo_labels: B×H×W int64 hard pseudo-labels in [0, C) (argmax of the fuzzy targets).
        valid_mask: B×H×W bool, False on padding / ignored pixels.
        num_classes: C.
        reduce: cross-rank sum (e.g. `engine.distributed.all_reduce_sum`); identity if None.

    Returns:
        Length-C float32 counts.
    """
    counts = torch.bincount(pseudo_labels[valid_mask].reshape(-1), minlength=num_classes)
    if counts.numel() != num_classes:
        raise ValueError(
            f"pseudo-labels must lie in [0, {num_classes}), got up to {counts.numel() - 1}"
        )
    counts = counts.float()
    return reduce(counts) if reduce is not None else counts


def class_weights(
    counts: torch.Tensor,
    alpha: float = 1.0,
    clip: tuple[float, float] = (0.1, 10.0),
    normalize: str = "classes",
) -> torch.Tensor:
    """Inverse-frequency class weights normalised to mean 1 over the present classes.

        w_c = (N / (C_b · n_c))^α          for n_c > 0   (N = Σ n_c, C_b = #{c : n_c > 0})
        w_c ← w_c / mean_{n_c' > 0} w_c'                       (normalize="classes", docs/method.md)
        w_c ← w_c / (Σ_c' n_c' w_c' / N)                       (normalize="pixels")
        w_c ← clip(w_c, lo, hi)
        w_c = 1                            for n_c = 0

    "classes" (the spec's reading) makes the average *class* weight 1; on long-tailed pseudo-
    labels the dominant class then falls to the lower clip and the mean *pixel* weight far below
    1, which shrinks the whole unlabeled loss. "pixels" makes the mean weight over the pixels 1:
    the same redistribution towards rare classes at an unchanged loss scale.

    An absent class gets weight 1 because no pixel carries that pseudo-label, so its weight
    multiplies nothing in `weighted_unsup_loss`; 1 keeps the "inside the soft CE" variant
    neutral for it too. With no present class every weight is 1. α = 0 gives all ones.

    Args:
        counts: length-C pixel counts n_c (e.g. from `class_counts` or `ema_counts`).
        alpha: exponent α ≥ 0; 1 is plain inverse frequency.
        clip: (lo, hi) bounds applied after the normalisation.
        normalize: "classes" (mean over present classes is 1) or "pixels" (mean over pixels is 1).

    Returns:
        Length-C float32 weights, no gradient.
    """
    counts = counts.detach().float()
    present = counts > 0
    num_present = present.sum().clamp_min(1)
    total = counts.sum()
    safe_counts = torch.where(present, counts, torch.ones_like(counts))
    raw = (total / (num_present * safe_counts)).pow(alpha)
    raw = torch.where(present, raw, torch.zeros_like(raw))
    if normalize == "classes":
        scale = raw.sum() / num_present
    elif normalize == "pixels":
        scale = (raw * counts).sum() / total.clamp_min(1.0)
    else:
        raise ValueError(f"normalize must be 'classes' or 'pixels', got {normalize!r}")
    weights = (raw / scale.clamp_min(torch.finfo(raw.dtype).tiny)).clamp(clip[0], clip[1])
    return torch.where(present, weights, torch.ones_like(weights))


def ema_counts(
    previous: torch.Tensor | None, counts: torch.Tensor, momentum: float
) -> torch.Tensor:
    """Exponential moving average of the class counts (the "ema" rebalancing variant).

        n̄_c ← m · n̄_c + (1 − m) · n_c,   n̄ = n on the first call (previous is None)

    Args:
        previous: the running counts, or None before the first batch; on any device (a value
            restored from a checkpoint is on the CPU), moved to ``counts``' device.
        counts: this batch's (global) counts.
        momentum: m in [0, 1).

    Returns:
        Length-C float32 running counts.
    """
    counts = counts.detach().float()
    if previous is None:
        return counts.clone()
    return momentum * previous.to(counts.device).float() + (1.0 - momentum) * counts
