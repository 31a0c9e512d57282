"""What every method shares: the batch it receives, the losses it returns, the supervised term,
and the mean-teacher preparation of an unlabeled batch (weak → teacher, strong + CutMix →
student)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from farcluss.augment import (CUTMIX_DRAWS, STRONG_AUGMENT_DRAWS, StrongAugment, apply_cutmix,
                               cutmix_masks, cutmix_masks_from_uniform, cutmix_partners,
                               cutmix_partners_from_keys, per_sample_uniform)
from farcluss.config import Config
from farcluss.losses.ce import cross_entropy, ohem_cross_entropy
from farcluss.models import build_model

Reduce = Callable[[Tensor], Tensor]


def _identity(tensor: Tensor) -> Tensor:
    return tensor


@dataclass
class Batch:
    """One iteration's data on the training device."""

    images_l: Tensor
    masks_l: Tensor
    images_u_weak: Optional[Tensor] = None
    #: ignore_index on crop padding, 0 elsewhere
    ignore_mask_u: Optional[Tensor] = None
    #: int64 (B_u,) sampler seeds of the unlabeled images; their strong views are drawn from them
    seeds_u: Optional[Tensor] = None


@dataclass
class LossOutput:
    """Unweighted loss terms, the coefficient of each in the total, and statistics to log."""

    terms: Dict[str, Tensor]
    weights: Dict[str, float]
    stats: Dict[str, Tensor] = field(default_factory=dict)

    def total(self) -> Tensor:
        total = None
        for name, term in self.terms.items():
            weight = self.weights.get(name, 1.0)
            # a zero-weight term still joins the graph (× 0) so DDP sees every parameter used
            part = term * weight
            total = part if total is None else total + part
        assert total is not None
        return total


@dataclass
class UnlabeledView:
    """A CutMixed strong view and the teacher's aligned outputs for it."""

    images_u_strong: Tensor
    teacher_probs: Tensor
    valid_mask: Tensor


def unsup_ramp(iteration: int, warmup_iterations: int, ramp: float, total_iterations: int) -> float:
    """r(t): 0 during warm-up, then linear from 0 to 1 over `ramp`·T iterations."""
    if iteration < warmup_iterations:
        return 0.0
    ramp_iterations = ramp * total_iterations
    if ramp_iterations <= 0:
        return 1.0
    return min(1.0, (iteration - warmup_iterations) / ramp_iterations)


class Method:
    """A method turns a batch into named losses; the engine does everything else."""

    name = "base"
    uses_teacher = False
    uses_unlabeled = False

    def __init__(self, cfg: Config, num_classes: int, reduce: Reduce = _identity,
                 world_size: int = 1):
        self.cfg = cfg
        self.num_classes = num_classes
        self.ignore_index = cfg.data.ignore_index
        self.reduce = reduce
        self.world_size = world_size

    # ---- model ------------------------------------------------------------------------------
    def projection_dim(self) -> int:
        return 0

    def build_student(self) -> nn.Module:
        m = self.cfg.model
        return build_model(
            self.num_classes,
            backbone=m.backbone,
            output_stride=m.output_stride,
            deep_stem=m.deep_stem,
            base_width=m.base_width,
            stem_width=m.stem_width,
            projection_dim=self.projection_dim(),
        )

    # ---- state that must survive a resume -----------------------------------------------------
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def to(self, device: torch.device) -> "Method":
        return self

    # ---- losses -------------------------------------------------------------------------------
    def supervised_loss(self, logits_l: Tensor, masks_l: Tensor) -> Tensor:
        t = self.cfg.train
        if t.loss == "ohem":
            return ohem_cross_entropy(logits_l, masks_l, ignore_index=self.ignore_index,
                                      threshold=t.ohem_threshold, min_kept=t.ohem_min_kept)
        return cross_entropy(logits_l, masks_l, ignore_index=self.ignore_index)

    def losses(self, batch: Batch, student: nn.Module, teacher: Optional[nn.Module],
               iteration: int) -> LossOutput:
        raise NotImplementedError


class MeanTeacherMethod(Method):
    """Shared by fixmatch and farcluss: teacher on the weak view, student on the strong view."""

    uses_teacher = True
    uses_unlabeled = True

    def __init__(self, cfg: Config, num_classes: int, reduce: Reduce = _identity,
                 world_size: int = 1, rank: int = 0):
        super().__init__(cfg, num_classes, reduce, world_size)
        a = cfg.augment
        self.strong_augment = StrongAugment(
            brightness=a.brightness, contrast=a.contrast, saturation=a.saturation, hue=a.hue,
            jitter_prob=a.jitter_prob, grayscale_prob=a.grayscale_prob, blur_prob=a.blur_prob,
            blur_sigma=a.blur_sigma, mean=cfg.data.mean, std=cfg.data.std,
        )
        # For batches without sampler seeds (training always has them) and for methods' other
        # draws; per rank and saved in checkpoints.
        self.generator = torch.Generator().manual_seed(cfg.train.seed * 1000003 + 7919 * rank + 1)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if "generator" in state:
            self.generator.set_state(state["generator"])

    def ramp_weight(self, iteration: int) -> float:
        m = self.cfg.method
        return m.lambda_u * unsup_ramp(iteration, m.warmup_iterations, m.ramp,
                                       self.cfg.train.iterations)

    def unsup_active(self, iteration: int) -> bool:
        return iteration >= self.cfg.method.warmup_iterations

    @torch.no_grad()
    def teacher_view(self, teacher: nn.Module, batch: Batch) -> UnlabeledView:
        """Teacher probabilities on the weak view; the strong view and targets share CutMix boxes.

        With ``batch.seeds_u`` every image draws its strong-view parameters, CutMix box and
        CutMix ordering key from its own seeded stream, so the view of an image is the same
        whichever rank holds it and however the global batch is split (DDP ≡ one process).
        """
        assert batch.images_u_weak is not None and batch.ignore_mask_u is not None
        teacher_logits = teacher(batch.images_u_weak)[0]
        teacher_probs = torch.softmax(teacher_logits.float(), dim=1)
        a = self.cfg.augment
        b, _, h, w = batch.images_u_weak.shape
        device = batch.images_u_weak.device
        if batch.seeds_u is not None:
            uniform = per_sample_uniform(batch.seeds_u, STRONG_AUGMENT_DRAWS + CUTMIX_DRAWS + 1)
            strong_uniform, box_uniform, partner_keys = uniform.split(
                [STRONG_AUGMENT_DRAWS, CUTMIX_DRAWS, 1], dim=1)
            params = self.strong_augment.params_from_uniform(strong_uniform).to(device)
            images_u_strong = self.strong_augment.apply(batch.images_u_weak, params)
            box_mask = cutmix_masks_from_uniform(box_uniform, h, w, prob=a.cutmix_prob,
                                                 area=a.cutmix_area, aspect=a.cutmix_aspect,
                                                 device=device)
            # the partner is another image of the local batch: this alone depends on the split
            partners = cutmix_partners_from_keys(partner_keys).to(device)
        else:
            images_u_strong = self.strong_augment(batch.images_u_weak, self.generator)
            box_mask = cutmix_masks(b, h, w, prob=a.cutmix_prob, area=a.cutmix_area,
                                    aspect=a.cutmix_aspect, generator=self.generator).to(device)
            partners = cutmix_partners(b, self.generator).to(device)
        images_u_strong = apply_cutmix(images_u_strong, box_mask, partners)
        teacher_probs = apply_cutmix(teacher_probs, box_mask, partners)
        ignore_mask = apply_cutmix(batch.ignore_mask_u, box_mask, partners)
        return UnlabeledView(images_u_strong, teacher_probs, ignore_mask != self.ignore_index)

    def global_count(self, count: Tensor) -> Tensor:
        """A pixel count summed over ranks, divided by the world size.

        Each rank divides its loss sum by this, so DDP's gradient average equals the gradient
        of (global sum / global count) — the same as one process with the whole batch.
        """
        return self.reduce(count.float()) / self.world_size


def confidence_stats(teacher_probs: Tensor, valid_mask: Tensor) -> Dict[str, Tensor]:
    confidence = teacher_probs.max(dim=1).values
    valid = valid_mask.float()
    n_valid = valid.sum().clamp_min(1.0)
    return {"confident_fraction": ((confidence > 0.95).float() * valid).sum() / n_valid}


def hard_pseudo_labels(teacher_probs: Tensor) -> tuple[Tensor, Tensor]:
    confidence, pseudo_labels = teacher_probs.max(dim=1)
    return confidence, pseudo_labels


def pixel_ce(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-pixel cross-entropy in fp32 (B×H×W)."""
    return F.cross_entropy(logits.float(), labels, reduction="none")
