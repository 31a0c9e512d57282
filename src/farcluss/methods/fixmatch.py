"""FixMatch on the mean-teacher template: hard pseudo-labels from the weak view, kept where their
confidence reaches `method.threshold` (0.95), learned by the student on each strong view.

    L_v = Σ_x 1[max p(x) ≥ τ] · CE(student_v(x), argmax p(x)) / #valid
"""

from __future__ import annotations

from typing import Dict

from torch import Tensor

from farcluss.config import resolved_threshold
from farcluss.losses.rebalance import class_counts
from farcluss.losses.unsup import weighted_unsup_loss
from farcluss.methods.base import (MeanTeacherMethod, UnlabeledView, confidence_stats,
                                   hard_pseudo_labels, pixel_ce)


class FixMatch(MeanTeacherMethod):
    name = "fixmatch"

    def view_loss(self, logits_u: Tensor, view: UnlabeledView
                  ) -> tuple[Tensor, Dict[str, Tensor]]:
        confidence, pseudo_labels = hard_pseudo_labels(view.teacher_probs)
        kept = view.valid_mask & (confidence >= resolved_threshold(self.cfg))
        # UniMatch's convention: divide by all valid pixels, not the kept ones
        loss = weighted_unsup_loss(pixel_ce(logits_u, pseudo_labels), kept, None,
                                   view.valid_mask, global_count=self.global_count)
        stats = confidence_stats(view.teacher_probs, view.valid_mask)
        stats["kept_fraction"] = kept.sum() / view.valid_mask.sum().clamp_min(1)
        counts = class_counts(pseudo_labels, kept, self.num_classes, reduce=self.reduce)
        stats["pseudo_label_frequency"] = counts / counts.sum().clamp_min(1.0)
        return loss, stats
