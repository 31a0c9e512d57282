"""Distribution alignment of the teacher's probabilities (docs/method.md §1b; ReMixMatch's
distribution alignment, Berthelot et al. 2020, read for pixels).

A teacher trained on a long-tailed labeled set predicts the frequent classes more often than
they occur: its confident pixels, and so its pseudo-labels, lean further to them than the data
does. Alignment rescales every pixel's distribution by how far the teacher's average prediction
on the unlabeled pixels is from the class prior of the labeled pixels, before pseudo-labels,
fuzzy targets and pixel weights are made from it.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from farcluss.losses.rebalance import class_counts

Reduce = Callable[[torch.Tensor], torch.Tensor]

#: smallest class frequency logit adjustment takes the log of: a class no labeled pixel has
#: shown yet gets a large but finite offset
PRIOR_FLOOR = 1e-4

#: added to prior and mean, so a class neither the labels nor the teacher has seen yet keeps a
#: finite ratio (≈ 1 when both are ~0)
ALIGNMENT_EPS = 1e-6


def label_frequency(labels: torch.Tensor, num_classes: int, ignore_index: int = 255,
                    reduce: Optional[Reduce] = None) -> torch.Tensor:
    """Share of each class among the labeled pixels of the (global) batch.

        π_c = |{x : y(x) = c}| / |{x : y(x) ≠ ignore}|

    Args:
        labels: B×H×W int64 ground truth, `ignore_index` on unlabeled pixels.
        num_classes: C.
        ignore_index: label of pixels to leave out.
        reduce: cross-rank sum (e.g. `engine.distributed.all_reduce_sum`); identity if None.

    Returns:
        Length-C float32 frequencies summing to 1 (all zeros when no pixel is labeled).
    """
    counts = class_counts(labels, labels != ignore_index, num_classes, reduce=reduce)
    return counts / counts.sum().clamp_min(1.0)


def mean_prediction(probs: torch.Tensor, valid_mask: torch.Tensor,
                    reduce: Optional[Reduce] = None) -> torch.Tensor:
    """The teacher's average class distribution over the valid pixels of the (global) batch.

        p̄_c = Σ_{x∈V} p_c(x) / |V|

    Args:
        probs: B×C×H×W probabilities.
        valid_mask: B×H×W bool, False on padding / ignored pixels.
        reduce: cross-rank sum; identity if None.

    Returns:
        Length-C float32 mean (sums to 1 when any pixel is valid, all zeros otherwise).
    """
    sums = (probs.float() * valid_mask.unsqueeze(1)).sum(dim=(0, 2, 3))
    count = valid_mask.sum().float().reshape(1)
    if reduce is not None:
        sums, count = reduce(sums), reduce(count)
    return sums / count.clamp_min(1.0)


def alignment_ratio(target_prior: torch.Tensor, prediction_mean: torch.Tensor,
                    eps: float = ALIGNMENT_EPS) -> torch.Tensor:
    """r_c = (π_c + ε) / (p̄_c + ε): the factor alignment puts on class c's probability before
    renormalising (length C, float32)."""
    return (target_prior.float() + eps) / (prediction_mean.float() + eps)


def align_distribution(probs: torch.Tensor, target_prior: torch.Tensor,
                       prediction_mean: torch.Tensor, eps: float = ALIGNMENT_EPS) -> torch.Tensor:
    """Rescale each pixel's distribution by target prior over running mean prediction.

        p̃_c(x) = p_c(x) · r_c / Σ_c' p_c'(x) · r_c',   r_c = (π_c + ε) / (p̄_c + ε)

    With π = p̄ it is the identity. A class the teacher predicts more often than the labels hold
    it (p̄_c > π_c) loses probability at every pixel; a rarer-than-labeled one gains, so a rare
    class the teacher almost picks can cross the confidence gate or the argmax.

    Args:
        probs: B×C×H×W probabilities.
        target_prior: length-C class prior π (e.g. the labeled pixels' frequencies).
        prediction_mean: length-C running mean p̄ of the teacher's predictions.
        eps: ε.

    Returns:
        B×C×H×W probabilities (each pixel sums to 1), no gradient.
    """
    ratio = alignment_ratio(target_prior, prediction_mean, eps)
    aligned = probs.detach().float() * ratio.to(probs.device).view(1, -1, 1, 1)
    return aligned / aligned.sum(dim=1, keepdim=True).clamp_min(torch.finfo(aligned.dtype).tiny)


def adjust_logits(logits: torch.Tensor, class_prior: torch.Tensor, tau: float,
                  floor: float = PRIOR_FLOOR) -> torch.Tensor:
    """Logit adjustment of a training loss (Menon et al. 2021, "Long-tail learning via logit
    adjustment"), read for pixels:

        s'_c(x) = s_c(x) + τ · log max(π_c, floor)

    The cross-entropy of s' on labels of prior π is minimised by raw logits s whose softmax
    estimates the class-balanced posterior p(y | x) / π_y (at τ = 1): a frequent class no
    longer wins a pixel only for being frequent. Only the loss sees s'; prediction, the
    teacher's pseudo-labels and evaluation use the raw s.

    Args:
        logits: B×C×H×W scores.
        class_prior: length-C class frequencies π (e.g. a running `label_frequency`).
        tau: τ ≥ 0; 0 returns ``logits`` unchanged.
        floor: π is clamped from below before the log.

    Returns:
        B×C×H×W float32 adjusted scores.
    """
    if tau == 0:
        return logits
    offset = tau * torch.log(class_prior.float().clamp_min(floor))
    return logits.float() + offset.to(logits.device).view(1, -1, 1, 1)
