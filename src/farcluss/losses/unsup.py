"""Reduction of the per-pixel unsupervised loss to a scalar (METHOD.md §3)."""

from __future__ import annotations

import torch


def weighted_unsup_loss(
    per_pixel_loss: torch.Tensor,
    pixel_weights: torch.Tensor | None,
    class_weights_per_pixel: torch.Tensor | None,
    valid_mask: torch.Tensor,
) -> torch.Tensor:
    """Weighted sum of the per-pixel losses over the number of valid pixels.

        L_unsup = Σ_{x∈V} u(x) · w(x) · ℓ(x) / |V|,   V = valid (non-ignored) pixels

    The denominator counts valid pixels, not pixels with a non-zero weight: a FixMatch
    confidence gate folded into u(x) then reproduces FixMatch / UniMatch exactly (K = 1, no
    weighting, no rebalancing), and down-weighted pixels lower the loss instead of being
    renormalised away.

    Args:
        per_pixel_loss: B×H×W loss ℓ(x) (e.g. `soft_cross_entropy`).
        pixel_weights: B×H×W u(x), or None for 1.
        class_weights_per_pixel: B×H×W w(x) = w_{argmax q(x)}, or None for 1.
        valid_mask: B×H×W bool.

    Returns:
        A float32 scalar; 0 (with a gradient path) when no pixel is valid.
    """
    weighted = per_pixel_loss.float()
    if pixel_weights is not None:
        weighted = weighted * pixel_weights.detach().float()
    if class_weights_per_pixel is not None:
        weighted = weighted * class_weights_per_pixel.detach().float()
    # where, not a product with the mask: a non-finite loss on a padded pixel must not leak.
    weighted = torch.where(valid_mask, weighted, torch.zeros_like(weighted))
    return weighted.sum() / valid_mask.sum().clamp_min(1)
