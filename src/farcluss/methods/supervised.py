"""The supervised baseline: cross-entropy (or OHEM) on the labeled batch only."""

from __future__ import annotations

from typing import Optional

from torch import nn

from farcluss.methods.base import Batch, LossOutput, Method


class Supervised(Method):
    name = "supervised"

    def losses(self, batch: Batch, student: nn.Module, teacher: Optional[nn.Module],
               iteration: int) -> LossOutput:
        logits_l = student(batch.images_l)[0]
        return LossOutput(terms={"sup": self.supervised_loss(logits_l, batch.masks_l)},
                          weights={"sup": 1.0})
