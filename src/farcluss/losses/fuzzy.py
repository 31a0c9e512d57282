"""Fuzzy top-K pseudo-labels and the soft cross-entropy that trains on them (docs/method.md §1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fuzzy_targets(
    teacher_probs: torch.Tensor, top_k: int, temperature: float = 1.0
) -> torch.Tensor:
    """Soft targets from the K most likely teacher classes.

        p̃_c(x) = p_t,c(x)^{1/T} / Σ_k p_t,k(x)^{1/T}        (= softmax(logits / T))
        T_K(x) = the K classes with the largest p̃(x)
        q_c(x) = p̃_c(x) / Σ_{k∈T_K(x)} p̃_k(x)   if c ∈ T_K(x), else 0

    The temperature acts on the probabilities as p^{1/T} renormalised, which equals a softmax of
    the teacher's logits divided by T; it is applied before the top-K selection. K = 1 gives
    the one-hot hard pseudo-label, K = C the whole (tempered) distribution. Ties are broken
    by `torch.topk`. The targets carry no gradient.

    Args:
        teacher_probs: B×C×H×W teacher probabilities (computed in float32).
        top_k: K, in [1, C].
        temperature: T > 0; 1 leaves the probabilities unchanged.

    Returns:
        B×C×H×W float32 targets, each pixel summing to 1.
    """
    num_classes = teacher_probs.shape[1]
    if not 1 <= top_k <= num_classes:
        raise ValueError(
            f"top_k must be in [1, {num_classes}] (the number of classes), got {top_k}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    probs = teacher_probs.detach().float()
    if temperature != 1.0:
        # In log space, so a sharp temperature cannot underflow every class to zero.
        probs = torch.softmax(torch.log(probs.clamp_min(0.0)) / temperature, dim=1)
    top_values, top_indices = probs.topk(top_k, dim=1)
    kept_mass = top_values.sum(dim=1, keepdim=True).clamp_min(torch.finfo(probs.dtype).tiny)
    return torch.zeros_like(probs).scatter_(1, top_indices, top_values / kept_mass)


def soft_cross_entropy(
    student_logits: torch.Tensor,
    targets: torch.Tensor,
    class_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-pixel cross-entropy against soft targets, optionally class-weighted.

        ℓ(x) = − Σ_c w_c · q_c(x) · log softmax(s(x))_c         (w_c = 1 without weights)

    The "inside" rebalancing variant of docs/method.md §3 passes `class_weights` here; the default
    variant weights the whole pixel loss afterwards (see `weighted_unsup_loss`).

    Args:
        student_logits: B×C×H×W student scores (log-softmax in float32).
        targets: B×C×H×W soft targets q (e.g. from `fuzzy_targets`).
        class_weights: optional length-C weights w.

    Returns:
        B×H×W float32 per-pixel losses.
    """
    log_probs = F.log_softmax(student_logits.float(), dim=1)
    weighted_targets = targets.float()
    if class_weights is not None:
        weighted_targets = weighted_targets * class_weights.float().view(1, -1, 1, 1)
    return -(weighted_targets * log_probs).sum(dim=1)
