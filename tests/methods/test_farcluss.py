import math

import pytest
import torch
from torch import nn

from farcluss.config import load_config
from farcluss.engine.ema import make_teacher
from farcluss.errors import ConfigError
from farcluss.methods import build_method
from farcluss.methods.base import Batch
from farcluss.methods.farcluss import Farcluss, FarclussState
from doubles import FixedTeacher

NUM_CLASSES = 3
SIZE = 8
TINY_MODEL = ["model.backbone=resnet18", "model.base_width=8", "method.projection_dim=16"]
FIXMATCH_EQUIVALENT = ["method.top_k=1", "method.weighting=none", "method.rebalance=off",
                       "method.contrastive=off", "method.threshold=0.95"]




class ConstantStudent(nn.Module):
    """Test double: logits 0 at every pixel, so every pixel's soft cross-entropy is log C."""

    def __init__(self):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(NUM_CLASSES))
        self.farcluss_state = FarclussState(NUM_CLASSES, 16)

    def forward(self, images):
        b, _, h, w = images.shape
        return self.logits.view(1, -1, 1, 1).expand(b, -1, h, w), images




def _farcluss(*overrides: str, num_classes: int = NUM_CLASSES) -> Farcluss:
    cfg = load_config(overrides=[*TINY_MODEL, "method.name=farcluss", "train.iterations=100",
                                 "method.ramp=0", *overrides])
    return build_method(cfg, num_classes)


def _stub_method(*overrides: str) -> Farcluss:
    """FARCLUSS without CutMix or the contrastive term, for losses worked out by hand."""
    return _farcluss("augment.cutmix_prob=0", "method.contrastive=off", *overrides)


def _probs(*per_image, size: int = SIZE) -> torch.Tensor:
    """B×C×size×size probabilities, one distribution per image."""
    probs = torch.tensor(per_image, dtype=torch.float32).view(len(per_image), NUM_CLASSES, 1, 1)
    return probs.expand(-1, -1, size, size).contiguous()


def _batch(num_unlabeled: int = 2, size: int = SIZE) -> Batch:
    return Batch(images_l=torch.randn(2, 3, size, size),
                 masks_l=torch.randint(0, NUM_CLASSES, (2, size, size)),
                 images_u_weak=torch.randn(num_unlabeled, 3, size, size),
                 ignore_mask_u=torch.zeros(num_unlabeled, size, size, dtype=torch.long),
                 seeds_u=torch.arange(num_unlabeled) + 1)


def _assert_finite(output) -> None:
    for name, term in output.terms.items():
        assert torch.isfinite(term).all(), name
    for name, value in output.stats.items():
        assert torch.isfinite(torch.as_tensor(value)).all(), name
    assert torch.isfinite(output.total())


ONE_HOT = [1.0, 0.0, 0.0]
UNIFORM = [1 / 3, 1 / 3, 1 / 3]
LOG_C = math.log(NUM_CLASSES)


# ---- configuration -------------------------------------------------------------------------

def test_top_k_above_the_class_count_is_a_config_error():
    with pytest.raises(ConfigError, match="method.top_k"):
        load_config(overrides=["data.num_classes=3", "method.top_k=4"])
    load_config(overrides=["data.num_classes=3", "method.top_k=3"])
    # a class list read from a file is known only when the method is built
    cfg = load_config(overrides=["method.top_k=5"])
    with pytest.raises(ConfigError, match="method.top_k"):
        build_method(cfg, NUM_CLASSES)


@pytest.mark.parametrize("switch", ["method.lambda_c=0", "method.contrastive=off"])
def test_without_the_contrastive_term_there_is_no_projection_head(switch):
    method = _farcluss(switch)
    student = method.build_student()
    # a call to project() on this model would raise, so the step below proves it is skipped
    assert student.projection is None
    output = method.losses(_batch(size=32), student, make_teacher(student), iteration=50)
    assert set(output.terms) == {"sup", "unsup"}
    assert "pull" not in output.stats


def test_contrastive_term_uses_the_head_and_fills_the_prototype_bank():
    torch.manual_seed(0)
    method = _farcluss("method.lambda_c=0.25")
    student = method.build_student()
    assert student.projection is not None
    assert "farcluss_state.prototypes" in student.state_dict()
    output = method.losses(_batch(size=32), student, make_teacher(student), iteration=50)
    assert set(output.terms) == {"sup", "unsup", "con"}
    assert output.weights["con"] == 0.25
    state = student.farcluss_state
    # every class is in the labeled masks, so every prototype is set and unit length
    assert state.prototype_initialized.all()
    assert torch.allclose(state.prototypes.norm(dim=1), torch.ones(NUM_CLASSES), atol=1e-5)


@pytest.mark.parametrize("threshold, expected", [(0.5, 2 / 3), (0.0, 1.0)])
def test_contrast_unlabeled_fraction_counts_the_pixels_the_gate_admits(threshold, expected):
    # image 0 one-hot (u = 1), image 1 [0.2, 0.5, 0.3] (u ≈ 0.06) with its right half padding:
    # valid 32·32 + 32·16 pixels, of which the gate u > 0.5 admits image 0's 32·32
    method = _farcluss("augment.cutmix_prob=0",
                       f"method.contrastive_weight_threshold={threshold}")
    student = method.build_student()
    batch = _batch(size=32)
    batch.ignore_mask_u[1, :, 16:] = 255
    teacher = FixedTeacher(_probs(ONE_HOT, [0.2, 0.5, 0.3], size=32))
    output = method.losses(batch, student, teacher, iteration=50)
    assert output.stats["contrast_unlabeled_fraction"].item() == pytest.approx(expected)


# ---- FixMatch as a special case ---------------------------------------------------------------

def test_fixmatch_equivalent_switches_reproduce_fixmatch_losses():
    torch.manual_seed(0)
    farcluss = _farcluss(*FIXMATCH_EQUIVALENT)
    fixmatch = build_method(load_config(overrides=[*TINY_MODEL, "method.name=fixmatch",
                                                   "train.iterations=100", "method.ramp=0"]),
                            NUM_CLASSES)
    student = farcluss.build_student()
    teacher = make_teacher(student)
    batch = _batch(size=32)
    batch.ignore_mask_u[0, :, 24:] = 255
    for iteration in (50, 51):  # twice: both generators advance alike
        torch.manual_seed(iteration)  # the same dropout masks in both student forwards
        expected = fixmatch.losses(batch, student, teacher, iteration)
        torch.manual_seed(iteration)
        actual = farcluss.losses(batch, student, teacher, iteration)
        # a meaningful comparison: the threshold keeps some pixels and drops others
        assert 0 < expected.stats["kept_fraction"].item() < 1
        assert set(actual.terms) == set(expected.terms) == {"sup", "unsup"}
        assert actual.weights == expected.weights
        for name in ("sup", "unsup"):
            assert actual.terms[name].item() == pytest.approx(expected.terms[name].item(),
                                                              abs=1e-6)
        assert torch.allclose(actual.stats["pseudo_label_frequency"],
                              expected.stats["pseudo_label_frequency"])


# ---- edge cases worked out by hand -------------------------------------------------------------

def test_uniform_teacher_gives_zero_weight_and_no_nan():
    method = _stub_method()
    output = method.losses(_batch(), ConstantStudent(), FixedTeacher(_probs(UNIFORM, UNIFORM)), 50)
    _assert_finite(output)
    assert output.terms["unsup"].item() == pytest.approx(0.0, abs=1e-6)
    assert output.stats["pixel_weight_mean"].item() == pytest.approx(0.0, abs=1e-6)
    assert output.stats["confident_fraction"].item() == 0.0


def test_one_hot_teacher_on_one_class_gives_weight_one():
    method = _stub_method()
    output = method.losses(_batch(), ConstantStudent(), FixedTeacher(_probs(ONE_HOT, ONE_HOT)), 50)
    _assert_finite(output)
    assert output.stats["pixel_weight_mean"].item() == pytest.approx(1.0)
    assert output.stats["confident_fraction"].item() == 1.0
    # one class present: its weight normalises to 1; K = 3 targets of a one-hot pixel are one-hot
    assert output.stats["class_weight_min"].item() == pytest.approx(1.0)
    assert output.stats["class_weight_max"].item() == pytest.approx(1.0)
    assert torch.allclose(output.stats["pseudo_label_frequency"], torch.tensor([1.0, 0.0, 0.0]))
    assert output.terms["unsup"].item() == pytest.approx(LOG_C, rel=1e-5)


def _absent_class_teacher() -> FixedTeacher:
    """Class 0 on 48 pixels, class 1 on 16, class 2 nowhere (one 8×8 image)."""
    probs = torch.zeros(1, NUM_CLASSES, SIZE, SIZE)
    probs[:, 0] = 1.0
    probs[:, :, :2] = torch.tensor([0.0, 1.0, 0.0]).view(1, 3, 1, 1)
    return FixedTeacher(probs)


@pytest.mark.parametrize("apply", ["pixel", "inside"])
def test_absent_class_rebalances_the_present_ones(apply):
    method = _stub_method(f"method.rebalance_apply={apply}")
    output = method.losses(_batch(num_unlabeled=1), ConstantStudent(), _absent_class_teacher(), 50)
    _assert_finite(output)
    # n = (48, 16, 0): raw weights N/(C_b·n) = (2/3, 2), mean 4/3 → w = (0.5, 1.5)
    assert output.stats["class_weight_min"].item() == pytest.approx(0.5)
    assert output.stats["class_weight_max"].item() == pytest.approx(1.5)
    assert torch.allclose(output.stats["pseudo_label_frequency"], torch.tensor([0.75, 0.25, 0.0]))
    # (48·0.5 + 16·1.5) / 64 · log C; one-hot targets make both placements of w agree
    assert output.terms["unsup"].item() == pytest.approx(0.75 * LOG_C, rel=1e-5)


def test_rebalance_off_weighs_every_class_alike():
    method = _stub_method("method.rebalance=off")
    output = method.losses(_batch(num_unlabeled=1), ConstantStudent(), _absent_class_teacher(), 50)
    assert output.stats["class_weight_min"].item() == output.stats["class_weight_max"].item() == 1.0
    assert output.terms["unsup"].item() == pytest.approx(LOG_C, rel=1e-5)


def test_ema_rebalancing_carries_counts_across_iterations():
    method = _stub_method("method.rebalance=ema", "method.rebalance_momentum=0.9")
    student = ConstantStudent()
    method.losses(_batch(num_unlabeled=1), student, _absent_class_teacher(), 50)
    state = student.farcluss_state
    assert torch.allclose(state.class_count_ema, torch.tensor([48.0, 16.0, 0.0]))
    flipped = FixedTeacher(_probs([0.0, 0.0, 1.0]))  # 64 pixels of class 2
    output = method.losses(_batch(num_unlabeled=1), student, flipped, 51)
    expected_counts = torch.tensor([0.9 * 48, 0.9 * 16, 0.1 * 64])
    assert torch.allclose(state.class_count_ema, expected_counts)
    # the frequencies logged are this batch's; the weights come from the running counts
    assert torch.allclose(output.stats["pseudo_label_frequency"], torch.tensor([0.0, 0.0, 1.0]))
    raw = expected_counts.sum() / (3 * expected_counts)
    assert output.stats["class_weight_max"].item() == pytest.approx(
        (raw / raw.mean()).max().item(), rel=1e-5)


def test_no_valid_unlabeled_pixel_gives_finite_stats_and_zero_unsup():
    batch = _batch()
    batch.ignore_mask_u.fill_(255)
    teacher = FixedTeacher(_probs(ONE_HOT, UNIFORM))
    output = _stub_method().losses(batch, ConstantStudent(), teacher, 50)
    _assert_finite(output)
    assert output.terms["unsup"].item() == 0.0
    assert output.stats["class_weight_min"].item() == output.stats["class_weight_max"].item() == 1.0
    assert output.stats["pseudo_label_frequency"].sum().item() == 0.0


def test_logged_statistics_by_hand():
    # image 0 one-hot (u = 1, confident), image 1 [0.2, 0.5, 0.3] (u = 1 − H/log 3, unsure)
    unsure = [0.2, 0.5, 0.3]
    certainty = 1 - (-sum(p * math.log(p) for p in unsure)) / LOG_C
    output = _stub_method().losses(_batch(), ConstantStudent(),
                                   FixedTeacher(_probs(ONE_HOT, unsure)), 50)
    assert set(output.stats) >= {"confident_fraction", "pixel_weight_mean", "class_weight_min",
                                 "class_weight_max", "pseudo_label_frequency"}
    assert output.stats["confident_fraction"].item() == pytest.approx(0.5)
    assert output.stats["pixel_weight_mean"].item() == pytest.approx((1 + certainty) / 2, rel=1e-5)
    assert torch.allclose(output.stats["pseudo_label_frequency"], torch.tensor([0.5, 0.5, 0.0]))
    # equal counts: both weights 1; any soft target against uniform student logits costs log C
    assert output.stats["class_weight_min"].item() == pytest.approx(1.0)
    assert output.terms["unsup"].item() == pytest.approx((1 + certainty) / 2 * LOG_C, rel=1e-5)


def test_weights_normalisation_keeps_the_unsup_loss_at_its_unweighted_scale():
    # every pixel costs log C against the constant student: a weighted mean of log C is log C,
    # whatever the pixel weights (1 and `certainty`) and class weights (0.5 and 1.5) are
    unsure = [0.2, 0.5, 0.3]
    for teacher, batch in [(FixedTeacher(_probs(ONE_HOT, unsure)), _batch()),
                           (_absent_class_teacher(), _batch(num_unlabeled=1))]:
        output = _stub_method("method.unsup_normalize=weights").losses(
            batch, ConstantStudent(), teacher, 50)
        assert output.terms["unsup"].item() == pytest.approx(LOG_C, rel=1e-5)


def test_weights_normalisation_of_a_uniform_teacher_is_zero_not_nan():
    method = _stub_method("method.unsup_normalize=weights")
    output = method.losses(_batch(), ConstantStudent(), FixedTeacher(_probs(UNIFORM, UNIFORM)), 50)
    _assert_finite(output)
    assert output.terms["unsup"].item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("mode, weight", [
    ("none", lambda h: 1.0),
    ("entropy", lambda h: 1 - h),
    ("exp", lambda h: math.exp(-2.0 * h)),
    ("power", lambda h: (1 - h) ** 3.0),
])
def test_weighting_modes(mode, weight):
    unsure = [0.2, 0.5, 0.3]
    h = (-sum(p * math.log(p) for p in unsure)) / LOG_C
    method = _stub_method(f"method.weighting={mode}", "method.weighting_beta=2.0",
                          "method.weighting_gamma=3.0")
    output = method.losses(_batch(num_unlabeled=1), ConstantStudent(),
                           FixedTeacher(_probs(unsure)), 50)
    assert output.stats["pixel_weight_mean"].item() == pytest.approx(weight(h), rel=1e-5)


def test_threshold_drops_unsure_pixels_from_the_sum_not_from_the_count():
    method = _stub_method("method.threshold=0.95", "method.weighting=none")
    output = method.losses(_batch(), ConstantStudent(), FixedTeacher(_probs(ONE_HOT, UNIFORM)), 50)
    assert output.terms["unsup"].item() == pytest.approx(0.5 * LOG_C, rel=1e-5)


def test_warm_up_skips_the_teacher_and_the_unsup_term():
    method = _stub_method("method.warmup_iterations=20", "method.ramp=0.1")
    teacher = FixedTeacher(_probs(ONE_HOT, ONE_HOT))
    output = method.losses(_batch(), ConstantStudent(), teacher, 19)
    assert set(output.terms) == {"sup"} and teacher.calls == 0
    output = method.losses(_batch(), ConstantStudent(), teacher, 25)
    assert teacher.calls == 1
    assert output.weights["unsup"] == pytest.approx(0.5)


# ---- the real model: no NaN or Inf in any edge case ------------------------------------------

def _teacher_probs(case: str) -> tuple[torch.Tensor, bool]:
    """(2×C×32×32 teacher probabilities, whether every unlabeled pixel is ignored)."""
    if case == "uniform":
        return _probs(UNIFORM, UNIFORM, size=32), False
    if case == "one_class":
        return _probs(ONE_HOT, ONE_HOT, size=32), False
    if case == "absent_class":
        return _probs(ONE_HOT, [0.0, 1.0, 0.0], size=32), False
    if case == "no_valid_pixel":
        return _probs(ONE_HOT, UNIFORM, size=32), True
    raise ValueError(case)


@pytest.mark.parametrize("case", ["uniform", "one_class", "absent_class", "no_valid_pixel"])
def test_full_method_stays_finite_in_every_edge_case(case):
    torch.manual_seed(0)
    method = _farcluss()
    student = method.build_student()
    probs, all_ignored = _teacher_probs(case)
    batch = _batch(size=32)
    if all_ignored:
        batch.ignore_mask_u.fill_(255)
    output = method.losses(batch, student, FixedTeacher(probs), iteration=50)
    assert set(output.terms) == {"sup", "unsup", "con"}
    _assert_finite(output)
    output.total().backward()
    for name, param in student.named_parameters():
        if param.grad is not None:
            assert torch.isfinite(param.grad).all(), name
    if case in ("uniform", "no_valid_pixel"):
        assert output.terms["unsup"].item() == pytest.approx(0.0, abs=1e-6)
