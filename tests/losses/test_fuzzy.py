import math

import pytest
import torch
import torch.nn.functional as F

from farcluss.losses.fuzzy import fuzzy_targets, soft_cross_entropy


def _pixel(values):
    """1×C×1×1 tensor holding one pixel's class values."""
    return torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1)


def test_top2_renormalises_the_two_largest_probabilities():
    targets = fuzzy_targets(_pixel([0.5, 0.3, 0.2]), top_k=2)
    assert torch.allclose(targets.flatten(), torch.tensor([0.625, 0.375, 0.0]))


def test_top1_is_the_one_hot_argmax():
    probs = torch.softmax(torch.randn(2, 5, 4, 4), dim=1)
    targets = fuzzy_targets(probs, top_k=1)
    assert torch.equal(targets, F.one_hot(probs.argmax(1), 5).permute(0, 3, 1, 2).float())


def test_top_c_keeps_the_distribution():
    probs = torch.softmax(torch.randn(2, 4, 3, 3), dim=1)
    assert torch.allclose(fuzzy_targets(probs, top_k=4), probs)


def test_targets_sum_to_one_and_carry_no_gradient():
    probs = torch.softmax(torch.randn(2, 6, 4, 4, requires_grad=True), dim=1)
    targets = fuzzy_targets(probs, top_k=3)
    assert not targets.requires_grad
    assert torch.allclose(targets.sum(1), torch.ones(2, 4, 4))
    assert ((targets > 0).sum(1) == 3).all()


def test_temperature_sharpens_before_top_k():
    # T = 0.5 → p^2 renormalised: [0.25, 0.09, 0.04] / 0.38.
    targets = fuzzy_targets(_pixel([0.5, 0.3, 0.2]), top_k=3, temperature=0.5)
    assert torch.allclose(targets.flatten(), torch.tensor([0.25, 0.09, 0.04]) / 0.38)


def test_temperature_equals_softmax_of_scaled_logits():
    logits = torch.randn(2, 5, 3, 3)
    targets = fuzzy_targets(torch.softmax(logits, 1), top_k=5, temperature=2.0)
    assert torch.allclose(targets, torch.softmax(logits / 2.0, 1), atol=1e-6)


def test_half_precision_input_gives_float32_targets():
    probs = torch.softmax(torch.randn(1, 4, 2, 2), dim=1).half()
    targets = fuzzy_targets(probs, top_k=2)
    assert targets.dtype == torch.float32
    assert torch.allclose(targets.sum(1), torch.ones(1, 2, 2))


@pytest.mark.parametrize("top_k", [0, 4])
def test_top_k_outside_1_to_c_is_rejected(top_k):
    with pytest.raises(ValueError, match="top_k"):
        fuzzy_targets(_pixel([0.5, 0.3, 0.2]), top_k=top_k)


def test_non_positive_temperature_is_rejected():
    with pytest.raises(ValueError, match="temperature"):
        fuzzy_targets(_pixel([0.5, 0.5]), top_k=1, temperature=0.0)


def test_soft_cross_entropy_two_classes_by_hand():
    student_logits = _pixel([math.log(0.7), math.log(0.3)])
    targets = _pixel([0.625, 0.375])
    loss = soft_cross_entropy(student_logits, targets)
    assert loss.shape == (1, 1, 1)
    expected = -(0.625 * math.log(0.7) + 0.375 * math.log(0.3))  # 0.674412
    assert math.isclose(loss.item(), expected, rel_tol=1e-5)


def test_soft_cross_entropy_with_class_weights_by_hand():
    student_logits = _pixel([math.log(0.7), math.log(0.3)])
    targets = _pixel([0.625, 0.375])
    loss = soft_cross_entropy(student_logits, targets, class_weights=torch.tensor([2.0, 1.0]))
    expected = -(2 * 0.625 * math.log(0.7) + 0.375 * math.log(0.3))  # 0.897333
    assert math.isclose(loss.item(), expected, rel_tol=1e-5)


def test_soft_cross_entropy_on_one_hot_targets_is_cross_entropy():
    logits = torch.randn(2, 4, 3, 3)
    labels = torch.randint(0, 4, (2, 3, 3))
    one_hot = F.one_hot(labels, 4).permute(0, 3, 1, 2).float()
    expected = F.cross_entropy(logits, labels, reduction="none")
    assert torch.allclose(soft_cross_entropy(logits.bfloat16(), one_hot), expected, atol=0.05)
    assert torch.allclose(soft_cross_entropy(logits, one_hot), expected, atol=1e-6)


def test_gradient_steps_move_the_student_toward_the_targets():
    targets = fuzzy_targets(_pixel([0.5, 0.3, 0.2]), top_k=2)
    logits = torch.zeros(1, 3, 1, 1, requires_grad=True)
    losses = []
    for _ in range(100):
        loss = soft_cross_entropy(logits, targets).sum()
        (gradient,) = torch.autograd.grad(loss, logits)
        with torch.no_grad():
            logits -= gradient
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    # The zero-target class only decays like 1/t; the distance to q must still shrink a lot.
    start = (torch.full((3,), 1 / 3) - targets.flatten()).abs().sum()
    end = (torch.softmax(logits, 1).flatten() - targets.flatten()).abs().sum()
    assert end < 0.2 * start
