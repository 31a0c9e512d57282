import math

import pytest
import torch

from farcluss.losses.align import (PRIOR_FLOOR, adjust_logits, align_distribution, alignment_ratio, label_frequency,
                                   mean_prediction)


def _pixel(*distributions):
    """1×C×1×N probabilities, one pixel per distribution."""
    return torch.tensor(distributions, dtype=torch.float32).t().reshape(1, -1, 1, len(distributions))


def test_align_distribution_by_hand():
    # p = [0.6, 0.3, 0.1], π = [0.5, 0.25, 0.25], p̄ = [0.8, 0.1, 0.1]
    # p·π/p̄ = [0.375, 0.75, 0.25], sum 1.375 → [3/11, 6/11, 2/11]: the argmax moves to class 1
    aligned = align_distribution(_pixel([0.6, 0.3, 0.1]), torch.tensor([0.5, 0.25, 0.25]),
                                 torch.tensor([0.8, 0.1, 0.1]), eps=0.0)
    assert torch.allclose(aligned.flatten(), torch.tensor([3 / 11, 6 / 11, 2 / 11]))


def test_alignment_ratio_by_hand_and_its_eps():
    ratio = alignment_ratio(torch.tensor([0.5, 0.0]), torch.tensor([0.25, 0.0]), eps=1e-6)
    # an unseen class (prior and mean both 0) keeps a ratio of 1
    assert torch.allclose(ratio, torch.tensor([(0.5 + 1e-6) / (0.25 + 1e-6), 1.0]))


def test_aligning_to_the_teachers_own_mean_changes_nothing():
    probs = torch.softmax(torch.randn(2, 4, 3, 5, generator=torch.Generator().manual_seed(0)), 1)
    mean = torch.tensor([0.4, 0.3, 0.2, 0.1])
    assert torch.allclose(align_distribution(probs, mean, mean), probs, atol=1e-6)


def test_aligned_pixels_are_distributions_without_gradient():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    aligned = align_distribution(torch.softmax(logits, 1), torch.tensor([0.7, 0.2, 0.1]),
                                 torch.tensor([0.9, 0.05, 0.05]))
    assert not aligned.requires_grad
    assert torch.allclose(aligned.sum(dim=1), torch.ones(2, 4, 4))


def test_label_frequency_counts_labeled_pixels_only():
    labels = torch.tensor([[[0, 1, 1], [2, 255, 255]]])
    assert torch.allclose(label_frequency(labels, 4), torch.tensor([0.25, 0.5, 0.25, 0.0]))
    # another rank's counts [3, 0, 1, 0] join before the division
    other_rank = torch.tensor([3.0, 0.0, 1.0, 0.0])
    global_frequency = label_frequency(labels, 4, reduce=lambda local: local + other_rank)
    assert torch.allclose(global_frequency, torch.tensor([4 / 8, 2 / 8, 2 / 8, 0.0]))
    assert torch.equal(label_frequency(torch.full((1, 2, 2), 255), 3), torch.zeros(3))


def test_mean_prediction_averages_valid_pixels_only():
    probs = _pixel([0.6, 0.4], [0.2, 0.8], [0.0, 1.0])
    valid = torch.tensor([[[True, True, False]]])
    assert torch.allclose(mean_prediction(probs, valid), torch.tensor([0.4, 0.6]))
    # a second rank with one valid pixel [1, 0]: sums [1.8, 1.2] over 3 pixels
    def reduce(local):
        return local + (torch.tensor([1.0, 0.0]) if local.numel() == 2 else torch.ones(1))
    assert torch.allclose(mean_prediction(probs, valid, reduce=reduce), torch.tensor([0.6, 0.4]))


def test_adjust_logits_adds_tau_log_prior_by_hand():
    logits = torch.zeros(1, 3, 1, 2)
    logits[0, 1, 0, 1] = 2.0
    prior = torch.tensor([0.5, 0.25, 0.25])
    adjusted = adjust_logits(logits, prior, tau=2.0)
    # 2·log 0.5 = −1.386294, 2·log 0.25 = −2.772589
    assert adjusted[0, :, 0, 0].tolist() == pytest.approx([-1.386294, -2.772589, -2.772589], abs=1e-5)
    assert adjusted[0, 1, 0, 1].item() == pytest.approx(2.0 - 2.772589, abs=1e-5)


def test_adjust_logits_is_the_identity_at_tau_zero_and_floors_an_unseen_class():
    logits = torch.randn(2, 3, 4, 4)
    assert adjust_logits(logits, torch.tensor([0.9, 0.1, 0.0]), tau=0.0) is logits
    adjusted = adjust_logits(logits, torch.tensor([0.9, 0.1, 0.0]), tau=1.0)
    assert torch.isfinite(adjusted).all()
    offset = (adjusted - logits)[:, 2]
    assert torch.allclose(offset, torch.full_like(offset, math.log(PRIOR_FLOOR)), atol=1e-5)


def test_logit_adjusted_loss_makes_the_balanced_posterior_its_minimiser():
    # one pixel whose class is 0 with probability 0.8 (its prior): the adjusted loss is
    # minimised where softmax(s + log π) = π, i.e. at raw logits that are equal (balanced)
    prior = torch.tensor([0.8, 0.2])
    logits = torch.zeros(1, 2, 1, 1, requires_grad=True)
    optimizer = torch.optim.SGD([logits], lr=1.0)
    for _ in range(200):
        adjusted = adjust_logits(logits, prior, tau=1.0)
        log_p = torch.log_softmax(adjusted, dim=1)[0, :, 0, 0]
        loss = -(prior * log_p).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.softmax(logits.detach(), dim=1)[0, :, 0, 0].tolist() == pytest.approx([0.5, 0.5], abs=1e-3)
