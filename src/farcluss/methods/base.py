"""What every method shares: the batch it receives, the losses it returns, the supervised term,
the teacher's lifecycle, and the mean-teacher template (weak view → teacher, strong views +
CutMix → student → named losses) whose steps a method overrides."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from farcluss.augment import (CUTMIX_DRAWS, STRONG_AUGMENT_DRAWS, StrongAugment, apply_cutmix,
                               cutmix_masks_from_uniform, cutmix_partners_from_keys,
                               per_sample_uniform)
from farcluss.config import Config, resolved_skeleton
from farcluss.engine.ema import copy_into_teacher, ema_momentum, make_teacher, update_teacher
from farcluss.losses.align import (adjust_logits, align_distribution, alignment_ratio,
                                   label_frequency, mean_prediction)
from farcluss.losses.ce import cross_entropy, ohem_cross_entropy
from farcluss.losses.rebalance import ema_counts
from farcluss.methods.perturbation import ComplementaryDropout, DropoutCopy
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
    """Unlabeled images as the student sees them and the teacher's aligned outputs for them:
    a CutMixed strong view, or the weak view itself (the target of the feature perturbation)."""

    images_u_strong: Tensor
    teacher_probs: Tensor
    valid_mask: Tensor
    #: method-specific teacher-side tensors (FARCLUSS: fuzzy targets, pixel weights), set by
    #: `MeanTeacherMethod.annotate_view` before the student's forward
    extra: Dict[str, Tensor] = field(default_factory=dict)


#: columns of an image's seeded stream one strong view reads: photometric draws, CutMix box,
#: CutMix ordering key
VIEW_DRAWS = STRONG_AUGMENT_DRAWS + CUTMIX_DRAWS + 1


def unsup_ramp(iteration: int, warmup_iterations: int, ramp: float, total_iterations: int) -> float:
    """r(t): 0 during warm-up, then linear from 0 to 1 over `ramp`·T iterations."""
    if iteration < warmup_iterations:
        return 0.0
    ramp_iterations = ramp * total_iterations
    if ramp_iterations <= 0:
        return 1.0
    return min(1.0, (iteration - warmup_iterations) / ramp_iterations)


class Method:
    """A method turns a batch into named losses; the engine does everything else.

    The engine calls the lifecycle hooks below around each step and never reads the method's
    config: a method without a teacher (supervised, UniMatch V1's online teacher) inherits
    these no-op versions.
    """

    name = "base"
    uses_unlabeled = False

    def __init__(self, cfg: Config, num_classes: int, reduce: Reduce = _identity,
                 world_size: int = 1, rank: int = 0):
        self.cfg = cfg
        self.num_classes = num_classes
        self.ignore_index = cfg.data.ignore_index
        self.reduce = reduce
        self.world_size = world_size
        #: running class frequency of the labeled pixels for logit adjustment
        #: (``train.logit_adjustment``); None until the first step. Global over ranks (every rank
        #: holds the same values) and saved in checkpoints.
        self.label_prior: Optional[Tensor] = None

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
            decoder_channels=m.decoder_channels,
            projection_dim=self.projection_dim(),
            arch=m.arch,
            vit_embed_dim=m.vit_embed_dim,
            vit_depth=m.vit_depth,
            frozen_backbone=m.freeze_backbone,
        )

    # ---- the teacher's lifecycle (engine hooks) ---------------------------------------------
    def make_teacher(self, student: nn.Module) -> Optional[nn.Module]:
        """The teacher model the engine keeps beside the student (None: no separate teacher)."""
        return None

    def startup_warnings(self) -> List[str]:
        """Problems with the configuration that do not stop training, said once by rank 0."""
        return []

    def before_step(self, iteration: int, student: nn.Module,
                    teacher: Optional[nn.Module]) -> None:
        """Called before step ``iteration`` (0-based) computes its losses."""

    def after_step(self, iteration: int, student: nn.Module,
                   teacher: Optional[nn.Module]) -> None:
        """Called after the optimizer step of iteration ``iteration`` (skipped steps excluded)."""

    def teacher_ready(self, completed_iterations: int) -> bool:
        """Whether the teacher is worth evaluating (and keeping as best.pt) after this many
        iterations."""
        return False

    # ---- state that must survive a resume -----------------------------------------------------
    def state_dict(self) -> dict:
        """This rank's state (random streams)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def global_state(self) -> dict:
        """State every rank shares, stored at the top level of last.pt."""
        if self.label_prior is None:
            return {}
        return {"label_prior": self.label_prior.detach().cpu()}

    def load_global_state(self, checkpoint: dict) -> None:
        if checkpoint.get("label_prior") is not None:
            self.label_prior = checkpoint["label_prior"].clone()

    # ---- losses -------------------------------------------------------------------------------
    def supervised_loss(self, logits_l: Tensor, masks_l: Tensor) -> Tensor:
        """The labeled batch's loss; every method calls it once per step (with logit
        adjustment on, that call also updates the running label prior)."""
        t = self.cfg.train
        if t.logit_adjustment > 0:
            with torch.no_grad():
                batch_prior = label_frequency(masks_l, self.num_classes, self.ignore_index,
                                              reduce=self.reduce)
                self.label_prior = ema_counts(self.label_prior, batch_prior,
                                              t.logit_adjustment_momentum)
            logits_l = adjust_logits(logits_l, self.label_prior, t.logit_adjustment)
        if t.loss == "ohem":
            return ohem_cross_entropy(logits_l, masks_l, ignore_index=self.ignore_index,
                                      threshold=t.ohem_threshold, min_kept=t.ohem_min_kept)
        return cross_entropy(logits_l, masks_l, ignore_index=self.ignore_index)

    def losses(self, batch: Batch, student: nn.Module, teacher: Optional[nn.Module],
               iteration: int) -> LossOutput:
        raise NotImplementedError


@dataclass
class StudentOutput:
    """The student's forward on ``[labeled; strong view 1; strong view 2 …]``."""

    logits: Tensor
    #: what a method's `student_forward` adds (FARCLUSS: the sampled pixels' embeddings)
    extra: Dict[str, Tensor] = field(default_factory=dict)


class MeanTeacherMethod(Method):
    """The mean-teacher template shared by fixmatch, unimatch and farcluss.

    One step: the weak view gives pseudo-label probabilities (from the EMA teacher, or from the
    student itself without gradient: ``method.teacher``); each of ``method.strong_views`` strong
    views draws its own photometric change and CutMix box, applied alike to images, targets and
    the ignore mask; the student runs once on ``[labeled; strong views]`` (with complementary
    channel masks when ``method.feature_perturbation=complementary``), and once more on the
    weak view's dropped-out features when it is ``dropout``. A method overrides the steps that
    differ: `annotate_view` (teacher-side targets), `student_forward`, `view_loss` (the loss of
    one unlabeled term) and `extra_terms`. The total is

        L = s·L_sup + s·λ_u·r(t)·[(1 − φ)/V · Σ_v L_v + φ·L_fp] (+ method terms)

    with V strong views, φ = ``method.fp_share`` when the dropout perturbation is on (else 0)
    and s = `loss_scale` (UniMatch halves the whole loss).

    It also owns the teacher's lifecycle: the teacher restarts as a copy of the student at the end
    of the warm-up, follows it by EMA from then on, and is evaluated only after it.
    """

    uses_unlabeled = True
    #: factor on every term of the template (UniMatch: L = (L_sup + …) / 2)
    loss_scale = 1.0

    def __init__(self, cfg: Config, num_classes: int, reduce: Reduce = _identity,
                 world_size: int = 1, rank: int = 0):
        super().__init__(cfg, num_classes, reduce, world_size, rank)
        a = cfg.augment
        self.strong_augment = StrongAugment(
            brightness=a.brightness, contrast=a.contrast, saturation=a.saturation, hue=a.hue,
            jitter_prob=a.jitter_prob, grayscale_prob=a.grayscale_prob, blur_prob=a.blur_prob,
            blur_sigma=a.blur_sigma, mean=cfg.data.mean, std=cfg.data.std,
        )
        self.skeleton = resolved_skeleton(cfg)
        # draws that are not tied to an image (contrastive pixel sampling); per rank, and saved
        # in checkpoints
        self.generator = torch.Generator().manual_seed(cfg.train.seed * 1000003 + 7919 * rank + 1)
        #: EMA updates since the teacher last restarted (m_t depends on it)
        self.ema_steps = 0
        #: running means of distribution alignment (§1b): the labeled pixels' class prior π and
        #: the teacher's mean prediction p̄; None until the first unlabeled step. Global over
        #: ranks (every rank holds the same values) and saved in checkpoints.
        self.alignment_prior: Optional[Tensor] = None
        self.alignment_mean: Optional[Tensor] = None
        self._alignment_stats: Dict[str, Tensor] = {}

    # ---- the teacher's lifecycle ----------------------------------------------------------------
    @property
    def warmup_iterations(self) -> int:
        return self.cfg.method.warmup_iterations

    def unsup_active(self, iteration: int) -> bool:
        return iteration >= self.warmup_iterations

    def make_teacher(self, student: nn.Module) -> Optional[nn.Module]:
        return make_teacher(student) if self.skeleton.teacher == "ema" else None

    def startup_warnings(self) -> List[str]:
        if self.warmup_iterations < self.cfg.train.iterations:
            return []
        # e.g. a short trial of a recipe whose warm-up was set for its full schedule
        return [f"method.warmup_iterations ({self.warmup_iterations}) is not below "
                f"train.iterations ({self.cfg.train.iterations}): {self.name} never uses the "
                "unlabeled images and trains as supervised"]

    def before_step(self, iteration: int, student: nn.Module,
                    teacher: Optional[nn.Module]) -> None:
        if teacher is not None and self.warmup_iterations > 0 \
                and iteration == self.warmup_iterations:
            # the teacher starts as a copy of the student at the end of the warm-up
            copy_into_teacher(teacher, student)
            self.ema_steps = 0

    def after_step(self, iteration: int, student: nn.Module,
                   teacher: Optional[nn.Module]) -> None:
        if teacher is not None and self.unsup_active(iteration):
            update_teacher(teacher, student,
                           ema_momentum(self.ema_steps, self.cfg.method.ema_momentum))
            self.ema_steps += 1

    def teacher_ready(self, completed_iterations: int) -> bool:
        # until the warm-up ends the teacher is the untrained initial model: its score would only
        # put a dip in the curves, and a best.pt then would hold it
        return self.skeleton.teacher == "ema" and completed_iterations > self.warmup_iterations

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if "generator" in state:
            self.generator.set_state(state["generator"])

    def global_state(self) -> dict:
        state: dict = {**super().global_state(), "ema_steps": self.ema_steps}
        if self.alignment_prior is not None and self.alignment_mean is not None:
            state["alignment"] = {"prior": self.alignment_prior.detach().cpu(),
                                  "mean": self.alignment_mean.detach().cpu()}
        return state

    def load_global_state(self, checkpoint: dict) -> None:
        super().load_global_state(checkpoint)
        self.ema_steps = int(checkpoint.get("ema_steps", 0))
        alignment = checkpoint.get("alignment")
        if alignment is not None:
            self.alignment_prior = alignment["prior"].clone()
            self.alignment_mean = alignment["mean"].clone()

    def ramp_weight(self, iteration: int) -> float:
        m = self.cfg.method
        return m.lambda_u * unsup_ramp(iteration, m.warmup_iterations, m.ramp,
                                       self.cfg.train.iterations)

    # ---- template steps -------------------------------------------------------------------------
    def weak_view(self, batch: Batch, student: nn.Module, teacher: Optional[nn.Module]
                  ) -> tuple[UnlabeledView, Optional[Tensor]]:
        """Pseudo-label probabilities on the weak view, and the student's logits on its
        dropped-out features (``feature_perturbation=dropout``; else None).

        The online teacher is the student's own clean prediction in the same forward, detached
        (UniMatch V1); with an EMA teacher the teacher predicts in eval mode.
        """
        assert batch.images_u_weak is not None and batch.ignore_mask_u is not None
        assert batch.seeds_u is not None, "unlabeled batches carry their sampler seeds"
        images_u_weak = batch.images_u_weak
        n_u = images_u_weak.shape[0]
        logits_fp = None
        online_logits = None
        if self.skeleton.feature_perturbation == "dropout":
            perturb = DropoutCopy(batch.seeds_u, offset=self.skeleton.strong_views * VIEW_DRAWS,
                                  drop_prob=self.cfg.method.fp_drop_prob)
            logits = student(images_u_weak, perturb=perturb)[0]
            online_logits, logits_fp = logits[:n_u].detach(), logits[n_u:]
        elif self.skeleton.teacher == "online":
            with torch.no_grad():
                online_logits = student(images_u_weak)[0]
        if self.skeleton.teacher == "online":
            teacher_logits = online_logits
        else:
            assert teacher is not None
            with torch.no_grad():
                teacher_logits = teacher(images_u_weak)[0]
        teacher_probs = torch.softmax(teacher_logits.float(), dim=1)
        valid_mask = batch.ignore_mask_u != self.ignore_index
        if self.cfg.method.distribution_alignment == "labels":
            teacher_probs = self.align_teacher_probs(teacher_probs, valid_mask, batch.masks_l)
        view = UnlabeledView(images_u_weak, teacher_probs, valid_mask)
        return view, logits_fp

    @torch.no_grad()
    def align_teacher_probs(self, teacher_probs: Tensor, valid_mask: Tensor,
                            masks_l: Tensor) -> Tensor:
        """Distribution alignment (§1b): update the running means π (labeled pixels' classes)
        and p̄ (the teacher's mean prediction, before alignment) with this global batch, then
        rescale the teacher's probabilities by π / p̄."""
        momentum = self.cfg.method.alignment_momentum
        batch_prior = label_frequency(masks_l, self.num_classes, self.ignore_index,
                                      reduce=self.reduce)
        batch_mean = mean_prediction(teacher_probs, valid_mask, reduce=self.reduce)
        self.alignment_prior = ema_counts(self.alignment_prior, batch_prior, momentum)
        self.alignment_mean = ema_counts(self.alignment_mean, batch_mean, momentum)
        ratio = alignment_ratio(self.alignment_prior, self.alignment_mean)
        # how hard alignment pushes: the largest and smallest factor on a class's probability
        self._alignment_stats = {"alignment_ratio_min": ratio.min(),
                                 "alignment_ratio_max": ratio.max()}
        return align_distribution(teacher_probs, self.alignment_prior, self.alignment_mean)

    @torch.no_grad()
    def strong_view(self, batch: Batch, weak: UnlabeledView, index: int = 0) -> UnlabeledView:
        """Strong view ``index`` of the unlabeled batch; targets and ignore mask share its boxes.

        Every image draws its photometric parameters, CutMix box and CutMix ordering key from its
        own seeded stream (view k reads columns k·VIEW_DRAWS onwards), so the view of an image
        is the same whichever rank holds it and however the global batch is split (DDP ≡ one
        process), and a resumed run redraws it.
        """
        assert batch.seeds_u is not None, "unlabeled batches carry their sampler seeds"
        a = self.cfg.augment
        images_u_weak = batch.images_u_weak
        _, _, h, w = images_u_weak.shape
        device = images_u_weak.device
        uniform = per_sample_uniform(batch.seeds_u, (index + 1) * VIEW_DRAWS)[:, index * VIEW_DRAWS:]
        strong_uniform, box_uniform, partner_keys = uniform.split(
            [STRONG_AUGMENT_DRAWS, CUTMIX_DRAWS, 1], dim=1)
        params = self.strong_augment.params_from_uniform(strong_uniform).to(device)
        images_u_strong = self.strong_augment.apply(images_u_weak, params)
        box_mask = cutmix_masks_from_uniform(box_uniform, h, w, prob=a.cutmix_prob,
                                             area=a.cutmix_area, aspect=a.cutmix_aspect,
                                             device=device)
        # the partner is another image of the local batch: this alone depends on the split
        partners = cutmix_partners_from_keys(partner_keys).to(device)
        images_u_strong = apply_cutmix(images_u_strong, box_mask, partners)
        teacher_probs = apply_cutmix(weak.teacher_probs, box_mask, partners)
        ignore_mask = apply_cutmix(batch.ignore_mask_u, box_mask, partners)
        return UnlabeledView(images_u_strong, teacher_probs, ignore_mask != self.ignore_index)

    def annotate_view(self, view: UnlabeledView) -> None:
        """Teacher-side tensors a method needs before the student's forward (in ``view.extra``)."""

    def student_perturbation(self, batch: Batch, n_l: int, views: List[UnlabeledView]):
        """The perturbation of the student's forward on ``[labeled; strong views]``."""
        if views and self.skeleton.feature_perturbation == "complementary":
            return ComplementaryDropout(batch.seeds_u, offset=len(views) * VIEW_DRAWS,
                                        plain_rows=n_l, keep_prob=self.cfg.method.fp_keep_prob)
        return None

    def student_forward(self, student: nn.Module, images: Tensor, batch: Batch,
                        views: List[UnlabeledView], perturb) -> StudentOutput:
        """The student on ``[labeled; strong views]``."""
        logits = student(images)[0] if perturb is None else student(images, perturb=perturb)[0]
        return StudentOutput(logits)

    def view_loss(self, logits_u: Tensor, view: UnlabeledView
                  ) -> tuple[Tensor, Dict[str, Tensor]]:
        """The loss of one unlabeled term (a strong view, or the perturbed weak view)."""
        raise NotImplementedError

    def extra_terms(self, output: StudentOutput, batch: Batch, views: List[UnlabeledView],
                    terms: Dict[str, Tensor], weights: Dict[str, float],
                    stats: Dict[str, Tensor]) -> None:
        """Terms a method adds beside the template's (FARCLUSS: the contrastive loss)."""

    # ---- one iteration ------------------------------------------------------------------------
    def losses(self, batch: Batch, student: nn.Module, teacher: Optional[nn.Module],
               iteration: int) -> LossOutput:
        n_l = batch.images_l.shape[0]
        views: List[UnlabeledView] = []
        weak = logits_fp = None
        if self.unsup_active(iteration):
            weak, logits_fp = self.weak_view(batch, student, teacher)
            views = [self.strong_view(batch, weak, k) for k in range(self.skeleton.strong_views)]
            for view in views + ([weak] if logits_fp is not None else []):
                self.annotate_view(view)
        images = torch.cat([batch.images_l] + [view.images_u_strong for view in views])
        output = self.student_forward(student, images, batch, views,
                                      self.student_perturbation(batch, n_l, views))

        s = self.loss_scale
        terms = {"sup": self.supervised_loss(output.logits[:n_l], batch.masks_l)}
        weights = {"sup": s}
        stats: Dict[str, Tensor] = {}
        if views:
            unsup_weight = s * self.ramp_weight(iteration)
            fp_share = self.cfg.method.fp_share if logits_fp is not None else 0.0
            n_u = views[0].images_u_strong.shape[0]
            for k, view in enumerate(views):
                name = "unsup" if k == 0 else f"unsup{k + 1}"
                logits_u = output.logits[n_l + k * n_u: n_l + (k + 1) * n_u]
                terms[name], view_stats = self.view_loss(logits_u, view)
                weights[name] = unsup_weight * (1.0 - fp_share) / len(views)
                if k == 0:  # the statistics of the first view stand for all
                    stats.update(view_stats)
            if logits_fp is not None:
                terms["fp"], _ = self.view_loss(logits_fp, weak)
                weights["fp"] = unsup_weight * fp_share
            stats.update(self._alignment_stats)
        self.extra_terms(output, batch, views, terms, weights, stats)
        return LossOutput(terms=terms, weights=weights, stats=stats)

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
