import math

import pytest
import torch
from torch import nn

from farcluss.config import load_config, resolved_threshold
from farcluss.methods import build_method
from farcluss.methods.base import Batch
from farcluss.methods.fixmatch import FixMatch
from doubles import FixedTeacher

NUM_CLASSES = 3
SIZE = 8


class ConstantStudent(nn.Module):
    """Test double: the same learnable logits at every pixel, so each pixel's loss is known."""

    def __init__(self, logits):
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(logits, dtype=torch.float32))

    def forward(self, images):
        b, _, h, w = images.shape
        return self.logits.view(1, -1, 1, 1).expand(b, -1, h, w), images




def _pixels(*per_image):
    """B×C×SIZE×SIZE probabilities, one distribution per image."""
    probs = torch.tensor(per_image, dtype=torch.float32)
    return probs.view(len(per_image), NUM_CLASSES, 1, 1).expand(-1, -1, SIZE, SIZE).contiguous()


def _fixmatch(*overrides: str) -> FixMatch:
    cfg = load_config(overrides=["method.name=fixmatch", "augment.cutmix_prob=0",
                                 "train.iterations=100", "method.ramp=0", *overrides])
    return build_method(cfg, NUM_CLASSES)


def _batch(num_unlabeled: int = 2, ignore_right_half_of_first: bool = False) -> Batch:
    ignore = torch.zeros(num_unlabeled, SIZE, SIZE, dtype=torch.long)
    if ignore_right_half_of_first:
        ignore[0, :, SIZE // 2:] = 255
    return Batch(images_l=torch.zeros(1, 3, SIZE, SIZE),
                 masks_l=torch.zeros(1, SIZE, SIZE, dtype=torch.long),
                 images_u_weak=torch.randn(num_unlabeled, 3, SIZE, SIZE),
                 ignore_mask_u=ignore, seeds_u=torch.arange(num_unlabeled) + 1)


# image 0: confident class 2; image 1: below the threshold, argmax class 0
CONFIDENT, UNSURE = [0.01, 0.01, 0.98], [0.6, 0.3, 0.1]
# student probabilities [1/4, 1/4, 1/2]: −log p = log 4 for classes 0, 1 and log 2 for class 2
STUDENT_LOGITS = [0.0, 0.0, math.log(2.0)]


def test_default_threshold_is_095():
    assert resolved_threshold(_fixmatch().cfg) == 0.95


def test_unsup_loss_by_hand_counts_confident_pixels_over_all_valid_ones():
    method = _fixmatch()
    teacher = FixedTeacher(_pixels(CONFIDENT, UNSURE))
    output = method.losses(_batch(ignore_right_half_of_first=True),
                           ConstantStudent(STUDENT_LOGITS), teacher, iteration=50)
    # 32 valid confident pixels (class 2, loss log 2), 64 valid unsure ones, 96 valid in all
    assert output.terms["unsup"].item() == pytest.approx(32 / 96 * math.log(2.0), rel=1e-5)
    assert output.weights["unsup"] == 1.0
    assert output.stats["kept_fraction"].item() == pytest.approx(32 / 96)
    assert output.stats["confident_fraction"].item() == pytest.approx(32 / 96)
    assert torch.allclose(output.stats["pseudo_label_frequency"], torch.tensor([0.0, 0.0, 1.0]))
    # the supervised term: class 0 everywhere on the labeled image
    assert output.terms["sup"].item() == pytest.approx(math.log(4.0), rel=1e-5)


def test_a_lower_threshold_keeps_more_pixels():
    method = _fixmatch("method.threshold=0.5")
    output = method.losses(_batch(), ConstantStudent(STUDENT_LOGITS),
                           FixedTeacher(_pixels(CONFIDENT, UNSURE)), iteration=50)
    expected = (64 * math.log(2.0) + 64 * math.log(4.0)) / 128
    assert output.terms["unsup"].item() == pytest.approx(expected, rel=1e-5)
    assert torch.allclose(output.stats["pseudo_label_frequency"], torch.tensor([0.5, 0.0, 0.5]))


def test_gradient_reaches_the_student_only():
    student = ConstantStudent(STUDENT_LOGITS)
    teacher = FixedTeacher(_pixels(CONFIDENT, CONFIDENT))
    output = _fixmatch().losses(_batch(), student, teacher, iteration=50)
    output.terms["unsup"].backward()
    # d/ds of −log softmax(s)_2 = softmax(s) − e_2 = [1/4, 1/4, −1/2]
    assert torch.allclose(student.logits.grad, torch.tensor([0.25, 0.25, -0.5]), atol=1e-6)


def test_no_valid_unlabeled_pixel_gives_a_finite_zero():
    batch = _batch()
    batch.ignore_mask_u.fill_(255)
    output = _fixmatch().losses(batch, ConstantStudent(STUDENT_LOGITS),
                                FixedTeacher(_pixels(CONFIDENT, CONFIDENT)), iteration=50)
    assert output.terms["unsup"].item() == 0.0
    assert torch.isfinite(output.total())
    for value in output.stats.values():
        assert torch.isfinite(value).all()


def test_warm_up_is_supervised_only_and_never_runs_the_teacher():
    method = _fixmatch("method.warmup_iterations=10", "method.ramp=0.1")
    teacher = FixedTeacher(_pixels(CONFIDENT, CONFIDENT))
    output = method.losses(_batch(), ConstantStudent(STUDENT_LOGITS), teacher, iteration=9)
    assert set(output.terms) == {"sup"} and teacher.calls == 0
    output = method.losses(_batch(), ConstantStudent(STUDENT_LOGITS), teacher, iteration=10)
    assert set(output.terms) == {"sup", "unsup"} and teacher.calls == 1
    assert output.weights["unsup"] == 0.0  # r(t) restarts from 0 at the end of the warm-up


def test_ramp_weights_the_unsup_term():
    method = _fixmatch("method.ramp=0.1", "method.lambda_u=0.5")
    output = method.losses(_batch(), ConstantStudent(STUDENT_LOGITS),
                           FixedTeacher(_pixels(CONFIDENT, CONFIDENT)), iteration=5)
    assert output.weights["unsup"] == pytest.approx(0.5 * 0.5)


def _labeled_half_0_half_2() -> Batch:
    batch = _batch()
    masks_l = torch.zeros(1, SIZE, SIZE, dtype=torch.long)
    masks_l[0, :, SIZE // 2:] = 2
    batch.masks_l = masks_l
    return batch


def test_distribution_alignment_by_hand_lets_the_unsure_image_through():
    # labeled prior π = [0.5, 0, 0.5]; the teacher's mean p̄ over the 128 unlabeled pixels is
    # [0.305, 0.155, 0.54]; ratio π/p̄ = [1.6393, ~0, 0.9259]. The unsure image [0.6, 0.3, 0.1]
    # becomes [0.9836, 0, 0.0926] / 1.0762 = [0.9140, 0, 0.0860]: above a 0.9 threshold, class 0.
    teacher = FixedTeacher(_pixels(CONFIDENT, UNSURE))
    plain = _fixmatch("method.threshold=0.9").losses(
        _labeled_half_0_half_2(), ConstantStudent(STUDENT_LOGITS), teacher, iteration=50)
    method = _fixmatch("method.threshold=0.9", "method.distribution_alignment=labels")
    aligned = method.losses(_labeled_half_0_half_2(), ConstantStudent(STUDENT_LOGITS), teacher,
                            iteration=50)
    # without alignment only the confident image (class 2, loss log 2) counts
    assert plain.terms["unsup"].item() == pytest.approx(0.5 * math.log(2.0), rel=1e-5)
    # with it the unsure image joins as class 0 (loss log 4): (64 log 2 + 64 log 4) / 128
    assert aligned.terms["unsup"].item() == pytest.approx(1.5 * math.log(2.0), rel=1e-5)
    assert aligned.stats["kept_fraction"].item() == pytest.approx(1.0)
    assert torch.allclose(aligned.stats["pseudo_label_frequency"], torch.tensor([0.5, 0.0, 0.5]))
    assert torch.allclose(method.alignment_prior, torch.tensor([0.5, 0.0, 0.5]))
    assert torch.allclose(method.alignment_mean, torch.tensor([0.305, 0.155, 0.54]))
    assert aligned.stats["alignment_ratio_max"].item() == pytest.approx(0.5 / 0.305, rel=1e-4)
    assert "alignment_ratio_max" not in plain.stats


def test_alignment_means_are_running_means_saved_with_the_run():
    teacher = FixedTeacher(_pixels(CONFIDENT, UNSURE))
    method = _fixmatch("method.distribution_alignment=labels", "method.alignment_momentum=0.9")
    method.losses(_labeled_half_0_half_2(), ConstantStudent(STUDENT_LOGITS), teacher, iteration=50)
    # second step: every labeled pixel is class 1 → π = 0.9·[0.5, 0, 0.5] + 0.1·[0, 1, 0]
    method.losses(Batch(
        images_l=torch.zeros(1, 3, SIZE, SIZE), masks_l=torch.ones(1, SIZE, SIZE, dtype=torch.long),
        images_u_weak=torch.randn(2, 3, SIZE, SIZE),
        ignore_mask_u=torch.zeros(2, SIZE, SIZE, dtype=torch.long),
        seeds_u=torch.tensor([1, 2])), ConstantStudent(STUDENT_LOGITS), teacher, iteration=51)
    assert torch.allclose(method.alignment_prior, torch.tensor([0.45, 0.1, 0.45]))
    assert torch.allclose(method.alignment_mean, torch.tensor([0.305, 0.155, 0.54]))
    # a resumed method continues from the saved means, not from the next batch alone
    resumed = _fixmatch("method.distribution_alignment=labels", "method.alignment_momentum=0.9")
    resumed.load_global_state(method.global_state())
    assert torch.equal(resumed.alignment_prior, method.alignment_prior)
    assert torch.equal(resumed.alignment_mean, method.alignment_mean)
    assert "alignment" not in _fixmatch().global_state()
