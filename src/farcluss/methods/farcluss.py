"""FARCLUSS (docs/method.md): a mean teacher whose unlabeled loss keeps uncertain pixels as signal.

    L = L_sup + λ_u · r(t) · L_unsup + λ_c · L_con
    L_unsup = Σ_x u(x) · w_{argmax q(x)} · ℓ(x) / #valid      (method.unsup_normalize=valid)

with fuzzy top-K targets q (§1), entropy pixel weights u (§2), batch class weights w (§3) and a
prototype contrastive loss on the decoder feature (§4). Every reading is a config value; with
K=1, weighting none, rebalance off, contrastive off and a threshold it is FixMatch.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

from farcluss.config import Config, resolved_threshold
from farcluss.errors import ConfigError
from farcluss.losses.contrastive import (contrastive_labels, downsample_labels,
                                         global_prototypes, prototype_contrastive_loss,
                                         prototype_sums, sample_pixels_per_class,
                                         update_prototype_bank)
from farcluss.losses.fuzzy import fuzzy_targets, soft_cross_entropy
from farcluss.losses.rebalance import class_counts, class_weights, ema_counts
from farcluss.losses.unsup import weighted_unsup_loss
from farcluss.losses.weighting import pixel_weights
from farcluss.methods.base import (Batch, MeanTeacherMethod, Reduce, StudentOutput,
                                   UnlabeledView, _identity, confidence_stats)


class FarclussState(nn.Module):
    """Statistics that persist across iterations: prototype bank (C×D) and class-count EMA.

    A submodule of the student, so it is saved in checkpoints and moves with the device.
    """

    def __init__(self, num_classes: int, projection_dim: int):
        super().__init__()
        self.register_buffer("prototypes", torch.zeros(num_classes, projection_dim))
        self.register_buffer("prototype_initialized", torch.zeros(num_classes, dtype=torch.bool))
        self.register_buffer("class_count_ema", torch.zeros(num_classes))
        self.register_buffer("class_count_ema_initialized", torch.zeros((), dtype=torch.bool))


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def class_weight_range(weights_c: Tensor, present: Tensor) -> Dict[str, Tensor]:
    """Smallest and largest weight over the classes present in the batch (1 when none is)."""
    # masked reductions rather than indexing, so the log costs no device synchronisation
    inf = torch.full_like(weights_c, float("inf"))
    one = torch.ones_like(weights_c[0])
    smallest = torch.where(present, weights_c, inf).min()
    largest = torch.where(present, weights_c, -inf).max()
    any_present = present.any()
    return {"class_weight_min": torch.where(any_present, smallest, one),
            "class_weight_max": torch.where(any_present, largest, one)}


class Farcluss(MeanTeacherMethod):
    name = "farcluss"

    def __init__(self, cfg: Config, num_classes: int, reduce: Reduce = _identity,
                 world_size: int = 1, rank: int = 0):
        super().__init__(cfg, num_classes, reduce, world_size, rank)
        # config validation checks this when the class count is in the config; a class list
        # read from a file is only known here, before the first iteration
        if cfg.method.top_k > num_classes:
            raise ConfigError(f"config key 'method.top_k' is {cfg.method.top_k} but there are "
                              f"only {num_classes} classes")

    @property
    def contrastive_on(self) -> bool:
        m = self.cfg.method
        return m.contrastive == "prototype" and m.lambda_c > 0

    def projection_dim(self) -> int:
        return self.cfg.method.projection_dim if self.contrastive_on else 0

    def build_student(self) -> nn.Module:
        student = super().build_student()
        student.farcluss_state = FarclussState(self.num_classes, self.cfg.method.projection_dim)
        return student

    # ---- teacher-side targets (no gradient) --------------------------------------------------
    def teacher_targets(self, teacher_probs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Fuzzy targets q (§1), pixel weights u (§2) and pseudo-labels argmax q."""
        m = self.cfg.method
        targets = fuzzy_targets(teacher_probs, m.top_k, temperature=m.temperature)
        weights_u = pixel_weights(teacher_probs, mode=m.weighting, beta=m.weighting_beta,
                                  gamma=m.weighting_gamma)
        # max(dim=1).indices is argmax (first maximum on ties); CPU argmax over the channel
        # dimension takes ~15x longer (3 ms of a 140 ms benchmark step)
        pseudo_labels = targets.max(dim=1).indices
        return targets, weights_u, pseudo_labels

    # ---- the unlabeled loss ---------------------------------------------------------------------
    def unsup_loss(self, logits_u: Tensor, teacher_probs: Tensor, valid_mask: Tensor,
                   state: FarclussState, targets: Tensor, weights_u: Tensor,
                   pseudo_labels: Tensor) -> tuple[Tensor, Dict[str, Tensor]]:
        """L_unsup = Σ_x u(x) · w_{argmax q(x)} · ℓ(x) / #valid (or / Σ_x u·w), and its statistics;
        `targets`, `weights_u` and `pseudo_labels` come from `teacher_targets`."""
        m = self.cfg.method
        kept = valid_mask
        threshold = resolved_threshold(self.cfg)
        if threshold > 0:
            kept = kept & (teacher_probs.max(dim=1).values >= threshold)

        batch_counts = class_counts(pseudo_labels, kept, self.num_classes, reduce=self.reduce)
        counts = batch_counts
        if m.rebalance == "ema":
            previous = state.class_count_ema if bool(state.class_count_ema_initialized) else None
            counts = ema_counts(previous, batch_counts, m.rebalance_momentum)
            state.class_count_ema.copy_(counts)
            state.class_count_ema_initialized.fill_(True)
        if m.rebalance == "off":
            weights_c = torch.ones(self.num_classes, device=logits_u.device)
        else:
            weights_c = class_weights(counts, alpha=m.rebalance_alpha, clip=m.rebalance_clip,
                                      normalize=m.rebalance_normalize)

        if m.rebalance_apply == "inside" and m.rebalance != "off":
            per_pixel = soft_cross_entropy(logits_u, targets, class_weights=weights_c)
            class_factor = None
        else:
            per_pixel = soft_cross_entropy(logits_u, targets)
            class_factor = weights_c[pseudo_labels]
        gated_weights = weights_u if kept is valid_mask else weights_u * kept
        loss = weighted_unsup_loss(per_pixel, gated_weights, class_factor, valid_mask,
                                   normalize=m.unsup_normalize, global_count=self.global_count)

        stats = confidence_stats(teacher_probs, valid_mask)
        n_local_valid = valid_mask.sum().clamp_min(1)
        stats["pixel_weight_mean"] = (weights_u * valid_mask).sum() / n_local_valid
        stats.update(class_weight_range(weights_c, counts > 0))
        stats["pseudo_label_frequency"] = batch_counts / batch_counts.sum().clamp_min(1.0)
        return loss, stats

    # ---- the contrastive loss -------------------------------------------------------------------
    def contrastive_labels(self, masks_l: Tensor, pseudo_labels: Optional[Tensor],
                           weights_u: Optional[Tensor], valid_u: Optional[Tensor]) -> Tensor:
        """Ground truth on labeled pixels; argmax q on unlabeled pixels with u(x) above
        `method.contrastive_weight_threshold` (0.5)."""
        if pseudo_labels is None:
            return masks_l
        return contrastive_labels(masks_l, pseudo_labels, weights_u,
                                  weight_threshold=self.cfg.method.contrastive_weight_threshold,
                                  ignore_index=self.ignore_index, valid_mask=valid_u)

    def sample_contrastive_pixels(self, pixel_labels: Tensor, feature_size: tuple[int, int]
                                  ) -> tuple[Tensor, Tensor]:
        """Indices into the ``B·h·w`` decoder pixels (at most `max_pixels_per_class` per class)
        and their labels; only these pixels go through the projection head.

        Fewer than two pixels are padded with ignored ones: the head's BatchNorm needs two
        values, and under DDP every rank must run the head so its gradients stay in step.
        """
        labels = downsample_labels(pixel_labels, feature_size).reshape(-1)
        valid_index = torch.nonzero(labels != self.ignore_index).squeeze(1)
        chosen = sample_pixels_per_class(labels[valid_index], self.num_classes,
                                         self.cfg.method.max_pixels_per_class,
                                         generator=self.generator)
        # ascending pixel order: the gather and its scatter-add backward walk memory in order
        # (~25 % faster on CPU); the loss does not depend on the order
        index = valid_index[chosen].sort().values
        sampled_labels = labels[index]
        if index.numel() < 2:
            padding = torch.arange(2 - index.numel(), device=index.device)
            index = torch.cat([index, padding])
            sampled_labels = torch.cat([sampled_labels,
                                        torch.full_like(padding, self.ignore_index)])
        return index, sampled_labels

    def contrastive_loss(self, embeddings: Tensor, labels: Tensor,
                         state: FarclussState) -> tuple[Tensor, Dict[str, Tensor]]:
        """Prototype contrast (§4) on the embeddings ``N × D`` of the sampled pixels."""
        m = self.cfg.method
        # the padding pixels' ignore label leaves them out of the sums and the loss; no copy of
        # the kept rows is made, and every rank's head joins backward even with no pixel kept
        sums, counts = prototype_sums(embeddings, labels, self.num_classes)
        # sums and counts over all ranks, so every rank pulls towards the same prototypes
        batch_prototypes, present = global_prototypes(sums, counts, reduce=self.reduce)
        loss, stats = prototype_contrastive_loss(
            embeddings, labels, batch_prototypes, present, state.prototypes,
            state.prototype_initialized, temperature=m.contrastive_temperature,
            pixel_count=self.global_count,
        )
        with torch.no_grad():
            bank, initialized = update_prototype_bank(
                state.prototypes, state.prototype_initialized, batch_prototypes.detach(),
                present, momentum=m.prototype_momentum,
            )
            state.prototypes.copy_(bank)
            state.prototype_initialized.copy_(initialized)
        return loss, stats

    # ---- the template's steps --------------------------------------------------------------------
    def annotate_view(self, view: UnlabeledView) -> None:
        targets, weights_u, pseudo_labels = self.teacher_targets(view.teacher_probs)
        view.extra.update(targets=targets, pixel_weights=weights_u, pseudo_labels=pseudo_labels)

    def view_loss(self, logits_u: Tensor, view: UnlabeledView
                  ) -> tuple[Tensor, Dict[str, Tensor]]:
        return self.unsup_loss(logits_u, view.teacher_probs, view.valid_mask, self._state,
                               targets=view.extra["targets"],
                               weights_u=view.extra["pixel_weights"],
                               pseudo_labels=view.extra["pseudo_labels"])

    def student_forward(self, student: nn.Module, images: Tensor, batch: Batch,
                        views: List[UnlabeledView], perturb) -> StudentOutput:
        model = _unwrap(student)
        # the student's persistent statistics, which this step's later hooks update
        self._state: FarclussState = model.farcluss_state
        if not self.contrastive_on:
            return super().student_forward(student, images, batch, views, perturb)
        # the pixels of the contrastive loss are known before the forward (ground truth and the
        # teacher's confident pseudo-labels), so the head projects only those
        n_l = batch.images_l.shape[0]
        if views:
            pixel_labels = self.contrastive_labels(
                batch.masks_l, torch.cat([v.extra["pseudo_labels"] for v in views]),
                torch.cat([v.extra["pixel_weights"] for v in views]),
                torch.cat([v.valid_mask for v in views]))
        else:
            pixel_labels = self.contrastive_labels(batch.masks_l, None, None, None)
        stats = {}
        if views:
            # how much of the unlabeled batch the u(x) gate lets into the contrast: the quantity
            # that decides what this loss can teach (docs/method.md)
            admitted = (pixel_labels[n_l:] != self.ignore_index).sum()
            valid = sum(v.valid_mask.sum() for v in views)
            stats["contrast_unlabeled_fraction"] = admitted / valid.clamp_min(1)
        feature_size = model.feature_size(*images.shape[-2:])
        project_index, contrast_labels = self.sample_contrastive_pixels(pixel_labels, feature_size)
        kwargs = {} if perturb is None else {"perturb": perturb}
        logits, _, embeddings = student(images, project_index=project_index, **kwargs)
        return StudentOutput(logits, extra={"embeddings": embeddings,
                                            "contrast_labels": contrast_labels, **stats})

    def extra_terms(self, output: StudentOutput, batch: Batch, views: List[UnlabeledView],
                    terms: Dict[str, Tensor], weights: Dict[str, float],
                    stats: Dict[str, Tensor]) -> None:
        if not self.contrastive_on:
            return
        if "contrast_unlabeled_fraction" in output.extra:
            stats["contrast_unlabeled_fraction"] = output.extra["contrast_unlabeled_fraction"]
        terms["con"], con_stats = self.contrastive_loss(
            output.extra["embeddings"], output.extra["contrast_labels"], self._state)
        weights["con"] = self.cfg.method.lambda_c
        stats.update(con_stats)
