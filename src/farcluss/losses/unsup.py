"""Reduction of the per-pixel unsupervised loss to a scalar (docs/method.md §3)."""

from __future__ import annotations

from typing import Callable, Literal

import torch

Count = Callable[[torch.Tensor], torch.Tensor]

#: smallest weight sum a "weights" normalisation divides by (all weights zero → loss 0)
_MIN_WEIGHT_SUM = 1e-6


def weighted_unsup_loss(
    per_pixel_loss: torch.Tensor,
    pixel_weights: torch.Tensor | None,
    class_weights_per_pixel: torch.Tensor | None,
    valid_mask: torch.Tensor,
    normalize: Literal["valid", "weights"] = "valid",
    global_count: Count | None = None,
) -> torch.Tensor:
    """Weighted sum of the per-pixel losses, over the valid pixels or over the weights.

        valid   (docs/method.md):  L_unsup = Σ_{x∈V} u(x) · w(x) · ℓ(x) / |V|
        weights (variant):    L_unsup = Σ_{x∈V} u(x) · w(x) · ℓ(x) / Σ_{x∈V} u(x) · w(x)

    V = valid (non-ignored) pixels. With ``valid`` a FixMatch confidence gate folded into u(x)
    reproduces FixMatch / UniMatch exactly (K = 1, no weighting, no rebalancing), and
    down-weighted pixels lower the loss. With ``weights`` the weights only redistribute the
    loss among pixels (a weighted mean), so the unlabeled loss keeps the scale of an unweighted
    one however small the weights are on average.

    Args:
        per_pixel_loss: B×H×W loss ℓ(x) (e.g. `soft_cross_entropy`).
        pixel_weights: B×H×W u(x), or None for 1.
        class_weights_per_pixel: B×H×W w(x) = w_{argmax q(x)}, or None for 1.
        valid_mask: B×H×W bool.
        normalize: ``valid`` or ``weights``, the denominator above.
        global_count: maps this rank's denominator to the one every rank divides by (under DDP
            the global sum / world size, `MeanTeacherMethod.global_count`); identity if None.

    Returns:
        A float32 scalar; 0 (with a gradient path) when no pixel is valid or every weight is 0.
    """
    weight = valid_mask.float()
    if pixel_weights is not None:
        weight = weight * pixel_weights.detach().float()
    if class_weights_per_pixel is not None:
        weight = weight * class_weights_per_pixel.detach().float()
    # where, not a product with the mask: a non-finite loss on a padded pixel must not leak.
    weighted = torch.where(valid_mask, weight * per_pixel_loss.float(),
                           torch.zeros_like(weight))
    if normalize == "valid":
        denominator, smallest = valid_mask.sum().float(), 1.0
    elif normalize == "weights":
        denominator, smallest = weight.sum(), _MIN_WEIGHT_SUM
    else:
        raise ValueError(f"normalize must be 'valid' or 'weights', got {normalize!r}")
    if global_count is not None:
        denominator = global_count(denominator)
    return weighted.sum() / denominator.clamp_min(smallest)
