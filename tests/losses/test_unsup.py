import torch
import torch.nn.functional as F

from farcluss.losses.fuzzy import fuzzy_targets, soft_cross_entropy
from farcluss.losses.unsup import weighted_unsup_loss
from farcluss.losses.weighting import confidence_mask


def test_weighted_loss_by_hand_divides_by_valid_pixels():
    per_pixel = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    pixel_weights = torch.tensor([[[1.0, 0.5], [0.0, 1.0]]])
    class_weights = torch.tensor([[[2.0, 1.0], [1.0, 1.0]]])
    valid = torch.tensor([[[True, True], [True, False]]])
    # (1·2·1 + 0.5·1·2 + 0·1·3) / 3 valid pixels
    loss = weighted_unsup_loss(per_pixel, pixel_weights, class_weights, valid)
    assert torch.isclose(loss, torch.tensor(1.0))


def test_without_weights_it_is_the_mean_over_valid_pixels():
    per_pixel = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    valid = torch.tensor([[[True, False], [True, False]]])
    assert torch.isclose(weighted_unsup_loss(per_pixel, None, None, valid), torch.tensor(2.0))


def test_no_valid_pixel_gives_zero_with_gradient_even_if_padding_is_infinite():
    per_pixel = torch.full((1, 2, 2), float("inf")).requires_grad_(True)
    loss = weighted_unsup_loss(per_pixel, None, None, torch.zeros(1, 2, 2, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(per_pixel.grad, torch.zeros(1, 2, 2))


def test_top1_with_confidence_threshold_reproduces_fixmatch():
    torch.manual_seed(0)
    teacher_probs = torch.softmax(3 * torch.randn(2, 4, 8, 8), dim=1)
    student_logits = torch.randn(2, 4, 8, 8)
    ignore_mask = torch.zeros(2, 8, 8, dtype=torch.long)
    ignore_mask[:, :, 6:] = 255
    valid = ignore_mask != 255

    per_pixel = soft_cross_entropy(student_logits, fuzzy_targets(teacher_probs, top_k=1))
    loss = weighted_unsup_loss(per_pixel, confidence_mask(teacher_probs, 0.95), None, valid)

    # FixMatch / UniMatch: CE on the hard label, masked by confidence, over valid pixels.
    confidence, hard_label = teacher_probs.max(dim=1)
    fixmatch = F.cross_entropy(student_logits, hard_label, reduction="none")
    fixmatch = (fixmatch * ((confidence >= 0.95) & valid)).sum() / valid.sum()
    assert 0 < ((confidence >= 0.95) & valid).sum() < valid.sum()
    assert torch.isclose(loss, fixmatch, atol=1e-6)


def test_weights_normalisation_by_hand_is_the_weighted_mean():
    per_pixel = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    pixel_weights = torch.tensor([[[1.0, 0.5], [0.0, 1.0]]])
    class_weights = torch.tensor([[[2.0, 1.0], [1.0, 1.0]]])
    valid = torch.tensor([[[True, True], [True, False]]])
    # (1·2·1 + 0.5·1·2 + 0·1·3) / (1·2 + 0.5·1 + 0·1); the invalid pixel counts in neither
    loss = weighted_unsup_loss(per_pixel, pixel_weights, class_weights, valid,
                               normalize="weights")
    assert torch.isclose(loss, torch.tensor(3.0 / 2.5))


def test_weights_normalisation_is_invariant_to_scaling_the_weights():
    torch.manual_seed(0)
    per_pixel = torch.rand(2, 4, 4)
    pixel_weights = torch.rand(2, 4, 4)
    valid = torch.rand(2, 4, 4) > 0.2
    small = weighted_unsup_loss(per_pixel, 0.01 * pixel_weights, None, valid, normalize="weights")
    large = weighted_unsup_loss(per_pixel, pixel_weights, None, valid, normalize="weights")
    assert torch.isclose(small, large, rtol=1e-5)
    # the docs/method.md reading shrinks with the weights
    shrunk = weighted_unsup_loss(per_pixel, 0.01 * pixel_weights, None, valid)
    assert torch.isclose(shrunk, 0.01 * weighted_unsup_loss(per_pixel, pixel_weights, None, valid))


def test_weights_normalisation_with_all_weights_zero_is_zero_not_nan():
    per_pixel = torch.ones(1, 2, 2, requires_grad=True)
    loss = weighted_unsup_loss(per_pixel, torch.zeros(1, 2, 2), None,
                               torch.ones(1, 2, 2, dtype=torch.bool), normalize="weights")
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(per_pixel.grad).all()


def test_global_count_divides_the_denominator():
    per_pixel = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    valid = torch.ones(1, 2, 2, dtype=torch.bool)
    # a rank whose global count says twice as many pixels exist elsewhere halves its share
    loss = weighted_unsup_loss(per_pixel, None, None, valid, global_count=lambda n: 2 * n)
    assert torch.isclose(loss, torch.tensor(10.0 / 8.0))


def test_unknown_normalisation_is_an_error():
    import pytest
    with pytest.raises(ValueError, match="normalize"):
        weighted_unsup_loss(torch.ones(1, 1, 1), None, None, torch.ones(1, 1, 1, dtype=torch.bool),
                            normalize="pixels")
