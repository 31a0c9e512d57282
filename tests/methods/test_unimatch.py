"""UniMatch's loss against numbers worked out by hand (V1 and the V2 reading).

V1: L = (L_sup + 0.25·L_s1 + 0.25·L_s2 + 0.5·L_fp) / 2, pseudo-labels from the student's own
clean weak-view prediction, each unlabeled term a sum over kept pixels divided by the valid ones.
"""

import math

import pytest
import torch
from torch import nn

from doubles import FixedTeacher
from farcluss.config import load_config
from farcluss.methods import build_method
from farcluss.methods.base import Batch
from farcluss.methods.perturbation import ComplementaryDropout, DropoutCopy

NUM_CLASSES = 3
SIZE = 8
N_L, N_U = 1, 2
# strong views without photometric change or CutMix: they are the weak view, so every term's
# kept pixels are known (CutMix and the views' own boxes are tested in test_base.py)
NO_AUGMENT = ["augment.jitter_prob=0", "augment.grayscale_prob=0", "augment.blur_prob=0",
              "augment.cutmix_prob=0"]

# the student's clean weak-view logits (its own pseudo-labels): image 0 is confident in class 2
# (p = e^5 / (e^5 + 2) = 0.9867 ≥ 0.95), image 1 is not (p = e / (e + 2) = 0.58)
WEAK_LOGITS = [[0.0, 0.0, 5.0], [1.0, 0.0, 0.0]]
SUP_LOGITS = [2.0, 0.0, 0.0]            # labeled image, ground truth class 0
S1_LOGITS = [0.0, 0.0, 0.0]             # −log p_2 = log 3
S2_LOGITS = [0.0, 0.0, math.log(2.0)]   # p = [1/4, 1/4, 1/2]: −log p_2 = log 2
FP_LOGITS = [0.0, math.log(3.0), 0.0]   # p = [1/5, 3/5, 1/5]: −log p_2 = log 5


class ScriptedStudent(nn.Module):
    """Test double: constant logits per block of rows, so each term's per-pixel loss is known.

    The weak-view forward (the N_U unlabeled images, with the feature perturbation) returns
    ``[clean; perturbed]`` rows; the student's forward on ``[labeled; view 1; view 2]`` returns
    one set of logits per block. The perturbation is applied to stand-in features, so its row
    bookkeeping is exercised as in the real model.
    """

    def __init__(self):
        super().__init__()
        self.weak = nn.Parameter(torch.tensor(WEAK_LOGITS))
        self.sup = nn.Parameter(torch.tensor(SUP_LOGITS))
        self.s1 = nn.Parameter(torch.tensor(S1_LOGITS))
        self.s2 = nn.Parameter(torch.tensor(S2_LOGITS))
        self.fp = nn.Parameter(torch.tensor(FP_LOGITS))
        self.perturbations = []

    @staticmethod
    def _fill(logits, rows):
        return logits.view(-1, NUM_CLASSES, 1, 1).expand(rows, -1, SIZE, SIZE) \
            if logits.dim() == 1 else logits.view(rows, NUM_CLASSES, 1, 1).expand(-1, -1, SIZE, SIZE)

    def forward(self, images, perturb=None):
        rows = images.shape[0]
        if perturb is not None:
            self.perturbations.append(type(perturb).__name__)
            features = perturb([images, images])
            rows_out = features[0].shape[0]
        else:
            rows_out = rows
        if rows == N_U:  # the weak view
            blocks = [self._fill(self.weak, N_U)]
            if rows_out == 2 * N_U:
                blocks.append(self._fill(self.fp, N_U))
        else:
            assert rows_out == rows == N_L + 2 * N_U
            blocks = [self._fill(self.sup, N_L), self._fill(self.s1, N_U),
                      self._fill(self.s2, N_U)]
        return torch.cat(blocks), images


def _unimatch(*overrides: str):
    cfg = load_config(overrides=["model.backbone=resnet18", "model.base_width=8",
                                 "method.name=unimatch", "train.iterations=100", "method.ramp=0",
                                 *NO_AUGMENT, *overrides])
    return build_method(cfg, NUM_CLASSES)


def _batch() -> Batch:
    ignore = torch.zeros(N_U, SIZE, SIZE, dtype=torch.long)
    ignore[0, :, SIZE // 2:] = 255  # image 0 is padded on its right half
    return Batch(images_l=torch.zeros(N_L, 3, SIZE, SIZE),
                 masks_l=torch.zeros(N_L, SIZE, SIZE, dtype=torch.long),
                 images_u_weak=torch.randn(N_U, 3, SIZE, SIZE), ignore_mask_u=ignore,
                 seeds_u=torch.tensor([11, 22]))


def _ce(logits, label):
    """−log softmax(logits)[label], worked out with math alone."""
    return math.log(sum(math.exp(v) for v in logits)) - logits[label]


# the kept pixels: image 0's valid left half (32 pixels, pseudo-label 2) of 32 + 64 valid ones
KEPT_OVER_VALID = 32 / 96


def test_v1_loss_by_hand_four_terms_their_weights_and_valid_pixel_division():
    student = ScriptedStudent()
    output = _unimatch().losses(_batch(), student, None, iteration=50)
    expected_terms = {
        "sup": _ce(SUP_LOGITS, 0),
        "unsup": KEPT_OVER_VALID * math.log(3.0),
        "unsup2": KEPT_OVER_VALID * math.log(2.0),
        "fp": KEPT_OVER_VALID * math.log(5.0),
    }
    assert set(output.terms) == set(expected_terms)
    for name, value in expected_terms.items():
        assert output.terms[name].item() == pytest.approx(value, rel=1e-5), name
    # (L_sup + 0.25·L_s1 + 0.25·L_s2 + 0.5·L_fp) / 2
    assert output.weights == pytest.approx({"sup": 0.5, "unsup": 0.125, "unsup2": 0.125,
                                            "fp": 0.25})
    expected_total = (expected_terms["sup"] + 0.25 * expected_terms["unsup"]
                      + 0.25 * expected_terms["unsup2"] + 0.5 * expected_terms["fp"]) / 2
    assert output.total().item() == pytest.approx(expected_total, rel=1e-5)
    assert output.stats["kept_fraction"].item() == pytest.approx(KEPT_OVER_VALID)
    # the weak view's forward carries the dropout copy; the strong views' forward is plain
    assert student.perturbations == ["DropoutCopy"]


def test_v1_pseudo_labels_are_the_students_own_and_carry_no_gradient():
    student = ScriptedStudent()
    _unimatch().losses(_batch(), student, None, iteration=50).total().backward()
    # the online teacher is detached: its rows share the fp rows' forward but get no gradient
    assert student.weak.grad is None or not student.weak.grad.any()
    for name in ("sup", "s1", "s2", "fp"):
        assert getattr(student, name).grad.abs().sum() > 0, name
    # d/ds of (32/96)·0.25/2 · −log softmax(s)_2 for the fp logits s
    probs = torch.softmax(torch.tensor(FP_LOGITS), dim=0)
    expected = 0.25 * KEPT_OVER_VALID * (probs - torch.tensor([0.0, 0.0, 1.0]))
    assert torch.allclose(student.fp.grad, expected, atol=1e-6)


def test_threshold_decides_the_kept_pixels_and_the_division_stays_by_valid_ones():
    student = ScriptedStudent()
    output = _unimatch("method.threshold=0.5").losses(_batch(), student, None, iteration=50)
    # image 1 (p = 0.58) is kept too: 32 pixels with label 2 and 64 with label 0, of 96 valid
    expected = (32 * _ce(S1_LOGITS, 2) + 64 * _ce(S1_LOGITS, 0)) / 96
    assert output.terms["unsup"].item() == pytest.approx(expected, rel=1e-5)
    expected_fp = (32 * _ce(FP_LOGITS, 2) + 64 * _ce(FP_LOGITS, 0)) / 96
    assert output.terms["fp"].item() == pytest.approx(expected_fp, rel=1e-5)


def test_v2_reading_ema_teacher_complementary_masks_no_fp_term():
    student = ScriptedStudent()
    probs = torch.softmax(torch.tensor(WEAK_LOGITS), dim=1)
    teacher = FixedTeacher(probs.view(N_U, NUM_CLASSES, 1, 1).expand(-1, -1, SIZE, SIZE)
                           .contiguous())
    method = _unimatch("method.teacher=ema", "method.feature_perturbation=complementary")
    output = method.losses(_batch(), student, teacher, iteration=50)
    assert teacher.calls == 1
    # L = (L_sup + (L_s1 + L_s2)/2) / 2
    assert output.weights == pytest.approx({"sup": 0.5, "unsup": 0.25, "unsup2": 0.25})
    assert output.terms["unsup"].item() == pytest.approx(KEPT_OVER_VALID * math.log(3.0), rel=1e-5)
    assert output.terms["unsup2"].item() == pytest.approx(KEPT_OVER_VALID * math.log(2.0),
                                                          rel=1e-5)
    # both strong views go through one forward, perturbed by the complementary masks
    assert student.perturbations == ["ComplementaryDropout"]


def test_v1_defaults_two_views_dropout_online_and_a_one_view_fixmatch_reading():
    method = _unimatch()
    assert method.skeleton.teacher == "online" and method.skeleton.strong_views == 2
    assert method.skeleton.feature_perturbation == "dropout"
    assert method.make_teacher(nn.Linear(1, 1)) is None
    # the same method on one view without perturbation: L = (L_sup + L_s) / 2
    output = _unimatch("method.strong_views=1", "method.feature_perturbation=off").losses(
        _batch(), OneViewStudent(), None, iteration=50)
    assert output.weights == pytest.approx({"sup": 0.5, "unsup": 0.5})


class OneViewStudent(ScriptedStudent):
    """The scripted student for ``[labeled; view 1]`` and a plain weak-view forward."""

    def forward(self, images, perturb=None):
        assert perturb is None
        if images.shape[0] == N_U:
            return self._fill(self.weak, N_U), images
        return torch.cat([self._fill(self.sup, N_L), self._fill(self.s1, N_U)]), images


# ---- the perturbation on a real model: only the perturbed rows change ------------------------

def _tiny_model():
    torch.manual_seed(0)
    cfg = load_config(overrides=["model.backbone=resnet18", "model.base_width=8",
                                 "method.name=unimatch"])
    return build_method(cfg, NUM_CLASSES).build_student().eval()


def test_dropout_copy_leaves_the_clean_rows_as_the_unperturbed_forward():
    model = _tiny_model()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = model(images)[0]
        both = model(images, perturb=DropoutCopy(torch.tensor([5, 6]), offset=0, drop_prob=0.5))[0]
    assert both.shape[0] == 4
    assert torch.allclose(both[:2], plain, atol=1e-5)
    for i in range(2):
        assert not torch.allclose(both[2 + i], plain[i], atol=1e-3), i


def test_complementary_dropout_leaves_the_labeled_rows_alone_and_perturbs_both_views():
    model = _tiny_model()
    labeled, view = torch.randn(1, 3, 32, 32), torch.randn(2, 3, 32, 32)
    images = torch.cat([labeled, view, view])
    perturb = ComplementaryDropout(torch.tensor([5, 6]), offset=0, plain_rows=1, keep_prob=0.0)
    with torch.no_grad():
        plain = model(images)[0]
        perturbed = model(images, perturb=perturb)[0]
    assert torch.allclose(perturbed[:1], plain[:1], atol=1e-5)
    for row in range(1, 5):
        assert not torch.allclose(perturbed[row], plain[row], atol=1e-3), row
    # the two views of an image get different (complementary) masks
    assert not torch.allclose(perturbed[1:3], perturbed[3:5], atol=1e-3)
