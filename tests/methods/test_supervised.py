import pytest
import torch
import torch.nn.functional as F

from farcluss.config import load_config
from farcluss.losses.align import label_frequency
from farcluss.losses.ce import ohem_cross_entropy
from farcluss.methods import build_method
from farcluss.methods.base import Batch
from farcluss.methods.supervised import Supervised

NUM_CLASSES = 3




def _supervised(*overrides: str) -> Supervised:
    cfg = load_config(overrides=["method.name=supervised", "model.backbone=resnet18",
                                 "model.base_width=8", *overrides])
    return build_method(cfg, NUM_CLASSES)


def _batch() -> Batch:
    masks = torch.randint(0, NUM_CLASSES, (2, 32, 32))
    masks[0, :4] = 255  # an ignored band
    return Batch(images_l=torch.randn(2, 3, 32, 32), masks_l=masks)


def test_supervised_needs_no_teacher_no_unlabeled_data_and_no_head():
    method = _supervised()
    assert method.make_teacher(method.build_student()) is None and not method.uses_unlabeled
    assert method.build_student().projection is None


def test_loss_is_the_cross_entropy_of_the_labeled_batch():
    torch.manual_seed(0)
    method = _supervised()
    student = method.build_student().eval()  # eval: no dropout, so two forwards agree
    batch = _batch()
    output = method.losses(batch, student, None, iteration=0)
    assert set(output.terms) == {"sup"}
    expected = F.cross_entropy(student(batch.images_l)[0], batch.masks_l, ignore_index=255)
    assert output.terms["sup"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert output.total().item() == pytest.approx(expected.item(), rel=1e-5)


def test_ohem_is_used_when_configured():
    torch.manual_seed(0)
    method = _supervised("train.loss=ohem", "train.ohem_min_kept=100")
    student = method.build_student().eval()
    batch = _batch()
    output = method.losses(batch, student, None, iteration=0)
    expected = ohem_cross_entropy(student(batch.images_l)[0], batch.masks_l, threshold=0.7,
                                  min_kept=100)
    assert output.terms["sup"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_logit_adjustment_keeps_a_running_label_prior_and_adjusts_the_loss():
    torch.manual_seed(0)
    method = _supervised("train.logit_adjustment=1.0", "train.logit_adjustment_momentum=0.5")
    student = method.build_student().eval()
    batch = _batch()
    first = label_frequency(batch.masks_l, NUM_CLASSES)
    output = method.losses(batch, student, None, iteration=0)
    assert torch.allclose(method.label_prior, first)  # the first batch sets it
    logits = student(batch.images_l)[0]
    expected = F.cross_entropy(logits + first.log().view(1, -1, 1, 1), batch.masks_l,
                               ignore_index=255)
    assert output.terms["sup"].item() == pytest.approx(expected.item(), rel=1e-5)

    other = Batch(images_l=batch.images_l, masks_l=torch.zeros_like(batch.masks_l))
    method.losses(other, student, None, iteration=1)
    # m = 0.5: halfway between the first batch's frequencies and all-class-0
    assert torch.allclose(method.label_prior, 0.5 * first + 0.5 * torch.tensor([1.0, 0.0, 0.0]))

    state = method.global_state()
    resumed = _supervised("train.logit_adjustment=1.0", "train.logit_adjustment_momentum=0.5")
    resumed.load_global_state(state)
    assert torch.equal(resumed.label_prior, method.label_prior)


def test_without_logit_adjustment_no_prior_is_kept_or_saved():
    method = _supervised()
    student = method.build_student().eval()
    method.losses(_batch(), student, None, iteration=0)
    assert method.label_prior is None and method.global_state() == {}
