import math

import torch

from farcluss.losses.ce import cross_entropy, ohem_cross_entropy

IGNORE = 255


def _two_class_logits(true_class_probs):
    """1×2×1×W logits whose softmax gives class 0 exactly the listed probabilities."""
    p = torch.tensor(true_class_probs, dtype=torch.float64)
    logits = torch.stack([p.log(), (1 - p).log()]).float()
    return logits[None, :, None, :].clone().requires_grad_(True)


# Probability of the true class (class 0) per pixel; the last pixel is ignored.
PROBS = [0.9, 0.8, 0.6, 0.5, 0.3, 0.95, 0.1]
TARGET = torch.tensor([[[0, 0, 0, 0, 0, 0, IGNORE]]])


def _mean_nll(probs):
    return sum(-math.log(p) for p in probs) / len(probs)


def test_cross_entropy_is_mean_over_valid_pixels():
    logits = _two_class_logits([0.5, 0.25, 0.1])
    target = torch.tensor([[[0, 0, IGNORE]]])
    loss = cross_entropy(logits, target)
    assert math.isclose(loss.item(), (math.log(2) + math.log(4)) / 2, rel_tol=1e-5)


def test_cross_entropy_without_valid_pixels_is_zero_with_gradient():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    loss = cross_entropy(logits, torch.full((2, 4, 4), IGNORE))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_cross_entropy_computes_in_float32_for_half_inputs():
    logits = torch.randn(2, 3, 4, 4)
    target = torch.randint(0, 3, (2, 4, 4))
    loss = cross_entropy(logits.bfloat16(), target)
    assert loss.dtype == torch.float32
    assert torch.isclose(loss, cross_entropy(logits.bfloat16().float(), target))


def test_ohem_keeps_pixels_below_threshold():
    loss = ohem_cross_entropy(_two_class_logits(PROBS), TARGET, threshold=0.7, min_kept=2)
    assert math.isclose(loss.item(), _mean_nll([0.6, 0.5, 0.3]), rel_tol=1e-5)


def test_ohem_raises_threshold_to_keep_min_kept_hardest_pixels():
    loss = ohem_cross_entropy(_two_class_logits(PROBS), TARGET, threshold=0.7, min_kept=5)
    assert math.isclose(loss.item(), _mean_nll([0.3, 0.5, 0.6, 0.8, 0.9]), rel_tol=1e-5)


def test_ohem_with_min_kept_above_valid_count_keeps_every_valid_pixel():
    loss = ohem_cross_entropy(_two_class_logits(PROBS), TARGET, threshold=0.7, min_kept=100)
    assert math.isclose(loss.item(), _mean_nll(PROBS[:-1]), rel_tol=1e-5)


def test_ohem_sends_no_gradient_to_easy_or_ignored_pixels():
    logits = _two_class_logits(PROBS)
    ohem_cross_entropy(logits, TARGET, threshold=0.7, min_kept=0).backward()
    has_grad = logits.grad.abs().sum(dim=(0, 1, 2)) > 0
    assert has_grad.tolist() == [False, False, True, True, True, False, False]


def test_ohem_without_valid_pixels_is_zero_with_gradient():
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    loss = ohem_cross_entropy(logits, torch.full((1, 4, 4), IGNORE), min_kept=10)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(logits.grad).all()
