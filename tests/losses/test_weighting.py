import math

import pytest
import torch

from farcluss.losses.weighting import confidence_mask, normalized_entropy, pixel_weights

# p = [0.8, 0.2]: H / log 2 = −(0.8 ln 0.8 + 0.2 ln 0.2) / ln 2 = 0.721928
TWO_CLASS = torch.tensor([0.8, 0.2]).view(1, 2, 1, 1)
H_NORM = 0.7219281


def test_normalized_entropy_two_classes_by_hand():
    assert math.isclose(normalized_entropy(TWO_CLASS).item(), H_NORM, rel_tol=1e-5)


@pytest.mark.parametrize(
    ("mode", "kwargs", "expected"),
    [
        ("entropy", {}, 1 - H_NORM),  # 0.278072
        ("exp", {"beta": 1.0}, math.exp(-H_NORM)),  # 0.485815
        ("exp", {"beta": 2.0}, math.exp(-2 * H_NORM)),  # 0.236016
        ("power", {"gamma": 2.0}, (1 - H_NORM) ** 2),  # 0.077324
        ("none", {}, 1.0),
    ],
)
def test_two_class_weights_by_hand(mode, kwargs, expected):
    weight = pixel_weights(TWO_CLASS, mode=mode, **kwargs)
    assert weight.shape == (1, 1, 1)
    assert math.isclose(weight.item(), expected, rel_tol=1e-5)


@pytest.mark.parametrize("mode", ["entropy", "power"])
def test_uniform_probabilities_get_weight_zero(mode):
    weights = pixel_weights(torch.full((2, 5, 3, 3), 0.2), mode=mode, gamma=2.0)
    assert torch.allclose(weights, torch.zeros(2, 3, 3), atol=1e-6)


def test_exp_mode_on_uniform_probabilities_is_exp_minus_beta():
    weights = pixel_weights(torch.full((1, 4, 2, 2), 0.25), mode="exp", beta=3.0)
    assert torch.allclose(weights, torch.full((1, 2, 2), math.exp(-3.0)), atol=1e-6)


@pytest.mark.parametrize("mode", ["none", "entropy", "exp", "power"])
def test_one_hot_probabilities_get_weight_one_without_nan(mode):
    one_hot = torch.zeros(2, 4, 3, 3)
    one_hot[:, 1] = 1.0
    weights = pixel_weights(one_hot, mode=mode)
    assert torch.isfinite(weights).all()
    assert torch.equal(weights, torch.ones(2, 3, 3))


def test_single_class_gets_weight_one():
    weights = pixel_weights(torch.ones(2, 1, 3, 3), mode="entropy")
    assert torch.equal(weights, torch.ones(2, 3, 3))


def test_weights_carry_no_gradient_and_lie_in_unit_interval():
    logits = torch.randn(2, 6, 4, 4, requires_grad=True)
    for mode in ("entropy", "exp", "power"):
        weights = pixel_weights(torch.softmax(logits, 1).bfloat16(), mode=mode)
        assert not weights.requires_grad
        assert weights.dtype == torch.float32
        assert ((weights >= 0) & (weights <= 1)).all()


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match="entropyy"):
        pixel_weights(TWO_CLASS, mode="entropyy")


@pytest.mark.parametrize(("threshold", "expected"), [(0.95, 0.0), (0.8, 1.0), (0.0, 1.0)])
def test_confidence_mask_is_max_probability_at_least_threshold(threshold, expected):
    assert confidence_mask(TWO_CLASS, threshold).item() == expected
