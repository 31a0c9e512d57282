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
