"""Per-pixel weights of the unsupervised loss: teacher uncertainty (docs/method.md §2) and the
FixMatch confidence threshold kept for ablations."""

from __future__ import annotations

import math

import torch

WEIGHTING_MODES = ("none", "entropy", "exp", "power")


def normalized_entropy(teacher_probs: torch.Tensor) -> torch.Tensor:
    """Entropy of the teacher distribution divided by its maximum.

        h(x) = H(x) / log C,   H(x) = − Σ_c p_t,c(x) log p_t,c(x),   0 · log 0 = 0

    0 for a one-hot pixel, 1 for a uniform one. With a single class there is no uncertainty,
    so h = 0.

    Args:
        teacher_probs: B×C×H×W probabilities (computed in float32, no gradient).

    Returns:
        B×H×W float32 values in [0, 1].
    """
    probs = teacher_probs.detach().float().clamp(0.0, 1.0)
    num_classes = probs.shape[1]
    if num_classes == 1:
        return torch.zeros_like(probs[:, 0])
    entropy = torch.special.entr(probs).sum(dim=1)
    return (entropy / math.log(num_classes)).clamp(0.0, 1.0)


def pixel_weights(
    teacher_probs: torch.Tensor,
    mode: str = "entropy",
    beta: float = 1.0,
    gamma: float = 1.0,
) -> torch.Tensor:
    """Uncertainty weight u(x) of each unlabeled pixel, recomputed from the current teacher.

    With h(x) the normalised entropy (`normalized_entropy`):

        none:     u(x) = 1
        entropy:  u(x) = 1 − h(x)                 (the paper's default)
        exp:      u(x) = exp(−β · h(x))
        power:    u(x) = (1 − h(x))^γ

    Weights carry no gradient and lie in [0, 1].

    Args:
        teacher_probs: B×C×H×W teacher probabilities.
        mode: one of `WEIGHTING_MODES`.
        beta: β ≥ 0 of the "exp" mode.
        gamma: γ ≥ 0 of the "power" mode.

    Returns:
        B×H×W float32 weights.
    """
    if mode not in WEIGHTING_MODES:
        raise ValueError(
            f"unknown pixel weighting mode {mode!r}; expected one of {WEIGHTING_MODES}"
        )
    if mode == "none":
        return torch.ones_like(teacher_probs[:, 0], dtype=torch.float32)
    certainty = 1.0 - normalized_entropy(teacher_probs)
    if mode == "entropy":
        weights = certainty
    elif mode == "exp":
        weights = torch.exp(-beta * (1.0 - certainty))
    else:
        weights = certainty.pow(gamma)
    return weights.clamp(0.0, 1.0)


def confidence_mask(teacher_probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """FixMatch's hard confidence gate: 1 where max_c p_t,c(x) ≥ τ, else 0.

    τ = 0 keeps every pixel. Multiply it into the pixel weights: the unsupervised loss still
    divides by the number of valid pixels, not of confident ones (FixMatch / UniMatch).

    Returns:
        B×H×W float32 mask, no gradient.
    """
    confidence = teacher_probs.detach().float().amax(dim=1)
    return (confidence >= threshold).float()
