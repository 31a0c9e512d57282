"""Supervised losses on hard labels: cross-entropy and online hard example mining (OHEM).

Both average over pixels rather than summing, and both return a zero that still carries a
gradient when a batch has no usable pixel, so a fully ignored crop never produces NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255
) -> torch.Tensor:
    """Mean cross-entropy over the valid pixels.

        L = (1 / |V|) Σ_{x∈V} − log softmax(s(x))_{y(x)},   V = {x : y(x) ≠ ignore_index}

    Args:
        logits: B×C×H×W scores (any float dtype; computed in float32).
        target: B×H×W int64 labels, `ignore_index` where unlabeled.

    Returns:
        A scalar; 0 (with a gradient path) when no pixel is valid.
    """
    pixel_losses = F.cross_entropy(
        logits.float(), target, ignore_index=ignore_index, reduction="sum"
    )
    num_valid = (target != ignore_index).sum().clamp_min(1)
    return pixel_losses / num_valid


def ohem_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = 255,
    threshold: float = 0.7,
    min_kept: int = 200_000,
) -> torch.Tensor:
    """Cross-entropy averaged over the hard valid pixels (OCNet / UniMatch OHEM).

    With p(x) = softmax(s(x))_{y(x)} the probability of the true class and p_(k) the k-th
    smallest p over the valid pixels V of the whole batch:

        τ' = max(threshold, p_(k)),   k = min(min_kept, |V|)
        K  = {x ∈ V : p(x) < threshold} ∪ {x ∈ V : p(x) ≤ p_(k)}
        L  = (1 / |K|) Σ_{x∈K} − log p(x)

    i.e. keep the pixels the model finds hard (p < threshold), and if those are fewer than
    `min_kept`, keep the `min_kept` hardest valid pixels instead (ties at p_(k) are all kept).
    Unlike the reference implementation, which indexes the sorted probabilities at `min_kept`
    and compares strictly, a batch with at most `min_kept` valid pixels keeps all of them
    rather than dropping the easiest one.

    Args:
        logits: B×C×H×W scores (computed in float32).
        target: B×H×W int64 labels with `ignore_index`.
        threshold: probability below which a pixel counts as hard.
        min_kept: minimum number of pixels kept per batch (0 disables the floor).

    Returns:
        A scalar; 0 (with a gradient path) when no pixel is valid.
    """
    logits = logits.float()
    valid = target != ignore_index
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    pixel_losses = F.cross_entropy(logits, safe_target, reduction="none")
    with torch.no_grad():
        # −log p is the per-pixel loss, so p comes without a second softmax.
        true_class_probs = torch.exp(-pixel_losses)
        kept = valid & (true_class_probs < threshold)
        valid_probs = true_class_probs[valid]
        k = min(int(min_kept), valid_probs.numel())
        if k > 0:
            kth_smallest = torch.kthvalue(valid_probs, k).values
            kept |= valid & (true_class_probs <= kth_smallest)
    kept_losses = torch.where(kept, pixel_losses, torch.zeros_like(pixel_losses))
    return kept_losses.sum() / kept.sum().clamp_min(1)
