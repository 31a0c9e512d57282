"""FixMatch on a mean teacher: hard pseudo-labels from the teacher's weak view, kept where the
teacher's confidence reaches `method.threshold`, learned by the student on the strong view."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from farcluss.config import resolved_threshold
from farcluss.losses.rebalance import class_counts
from farcluss.losses.unsup import weighted_unsup_loss
from farcluss.methods.base import (Batch, LossOutput, MeanTeacherMethod, confidence_stats,
                                   hard_pseudo_labels, pixel_ce)


class FixMatch(MeanTeacherMethod):
    name = "fixmatch"

    def losses(self, batch: Batch, student: nn.Module, teacher: Optional[nn.Module],
               iteration: int) -> LossOutput:
        if not self.unsup_active(iteration) or teacher is None:
            logits_l = student(batch.images_l)[0]
            return LossOutput(terms={"sup": self.supervised_loss(logits_l, batch.masks_l)},
                              weights={"sup": 1.0})
        view = self.teacher_view(teacher, batch)
        n_l = batch.images_l.shape[0]
        logits = student(torch.cat([batch.images_l, view.images_u_strong]))[0]
        logits_l, logits_u = logits[:n_l], logits[n_l:]
        loss_sup = self.supervised_loss(logits_l, batch.masks_l)

        confidence, pseudo_labels = hard_pseudo_labels(view.teacher_probs)
        kept = view.valid_mask & (confidence >= resolved_threshold(self.cfg))
        # UniMatch's convention: divide by all valid pixels, not the kept ones
        loss_unsup = weighted_unsup_loss(pixel_ce(logits_u, pseudo_labels), kept, None,
                                         view.valid_mask, global_count=self.global_count)

        stats = confidence_stats(view.teacher_probs, view.valid_mask)
        stats["kept_fraction"] = kept.sum() / view.valid_mask.sum().clamp_min(1)
        counts = class_counts(pseudo_labels, kept, self.num_classes, reduce=self.reduce)
        stats["pseudo_label_frequency"] = counts / counts.sum().clamp_min(1.0)
        return LossOutput(
            terms={"sup": loss_sup, "unsup": loss_unsup},
            weights={"sup": 1.0, "unsup": self.ramp_weight(iteration)},
            stats=stats,
        )
