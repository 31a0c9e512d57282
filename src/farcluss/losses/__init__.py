"""Loss functions of FARCLUSS and its baselines: pure functions of tensors (docs/method.md §0–§4)."""

from farcluss.losses.ce import cross_entropy, ohem_cross_entropy
from farcluss.losses.contrastive import (
    contrastive_labels,
    downsample_labels,
    global_prototypes,
    prototype_contrastive_loss,
    prototype_sums,
    sample_pixels_per_class,
    update_prototype_bank,
)
from farcluss.losses.fuzzy import fuzzy_targets, soft_cross_entropy
from farcluss.losses.rebalance import class_counts, class_weights, ema_counts
from farcluss.losses.unsup import weighted_unsup_loss
from farcluss.losses.weighting import (
    WEIGHTING_MODES,
    confidence_mask,
    normalized_entropy,
    pixel_weights,
)

__all__ = [
    "WEIGHTING_MODES",
    "class_counts",
    "class_weights",
    "confidence_mask",
    "contrastive_labels",
    "cross_entropy",
    "downsample_labels",
    "ema_counts",
    "fuzzy_targets",
    "global_prototypes",
    "normalized_entropy",
    "ohem_cross_entropy",
    "pixel_weights",
    "prototype_contrastive_loss",
    "prototype_sums",
    "sample_pixels_per_class",
    "soft_cross_entropy",
    "update_prototype_bank",
    "weighted_unsup_loss",
]
