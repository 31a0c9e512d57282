import pytest
import torch

from farcluss.losses.rebalance import class_counts, class_weights, ema_counts


def test_class_counts_count_valid_pixels_only():
    labels = torch.tensor([[[0, 1, 1], [3, 1, 0]]])
    valid = torch.tensor([[[True, True, True], [True, False, False]]])
    assert class_counts(labels, valid, 4).tolist() == [1.0, 2.0, 0.0, 1.0]


def test_class_counts_go_through_reduce():
    labels = torch.tensor([[[0, 1], [1, 1]]])
    valid = torch.ones(1, 2, 2, dtype=torch.bool)
    other_rank = torch.tensor([5.0, 0.0, 2.0])
    counts = class_counts(labels, valid, 3, reduce=lambda local: local + other_rank)
    assert counts.tolist() == [6.0, 3.0, 2.0]


def test_class_counts_reject_labels_outside_the_classes():
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        class_counts(torch.tensor([[[0, 2]]]), torch.ones(1, 1, 2, dtype=torch.bool), 2)


def test_class_weights_by_hand():
    # N = 200, C_b = 3: raw = 200/300, 200/75, 200/225 = 2/3, 8/3, 8/9; mean = 38/27;
    # normalised = 9/19, 36/19, 12/19; the absent class gets 1.
    weights = class_weights(torch.tensor([100.0, 25.0, 0.0, 75.0]), alpha=1.0)
    assert torch.allclose(weights, torch.tensor([9 / 19, 36 / 19, 1.0, 12 / 19]))


def test_class_weights_with_alpha_half_by_hand():
    # raw ∝ n^-1/2 = 0.1, 0.2, 0.11547; mean 0.138490
    weights = class_weights(torch.tensor([100.0, 25.0, 75.0]), alpha=0.5)
    assert torch.allclose(weights, torch.tensor([0.722074, 1.444147, 0.833779]), atol=1e-5)


def test_class_weights_are_clipped_after_normalisation():
    # raw ∝ 1/n: 1 and 20 × 0.001, mean 1.02/21 → 20.59 and 0.0206 before clipping.
    weights = class_weights(torch.tensor([1.0] + [1000.0] * 20), clip=(0.1, 10.0))
    assert weights[0].item() == 10.0
    assert torch.allclose(weights[1:], torch.full((20,), 0.1))


def test_alpha_zero_gives_ones():
    assert torch.equal(class_weights(torch.tensor([100.0, 25.0, 0.0, 75.0]), alpha=0.0),
                       torch.ones(4))


def test_no_present_class_gives_ones():
    assert torch.equal(class_weights(torch.zeros(3)), torch.ones(3))


def test_single_present_class_gets_weight_one():
    assert torch.equal(class_weights(torch.tensor([0.0, 42.0, 0.0])), torch.ones(3))


def test_class_weights_depend_only_on_frequencies():
    counts = torch.tensor([10.0, 3.0, 0.0, 7.0])
    assert torch.allclose(class_weights(counts), class_weights(counts * 8))


def test_ema_counts_start_from_first_batch_then_average():
    first = ema_counts(None, torch.tensor([10.0, 0.0]), momentum=0.9)
    assert first.tolist() == [10.0, 0.0]
    second = ema_counts(first, torch.tensor([0.0, 20.0]), momentum=0.9)
    assert torch.allclose(second, torch.tensor([9.0, 2.0]))


def test_pixel_normalised_weights_keep_the_mean_pixel_weight_at_one():
    # counts [60, 30, 10]: raw w = N/(C_b n_c) = [100/180, 100/90, 100/30] = [5/9, 10/9, 10/3]
    # mean over pixels: (60·5/9 + 30·10/9 + 10·10/3) / 100 = (100/3 + 100/3 + 100/3) / 100 = 1
    # so the pixel-normalised weights equal the raw ones; the class mean would be 5/3 instead
    counts = torch.tensor([60.0, 30.0, 10.0])
    by_pixels = class_weights(counts, alpha=1.0, clip=(0.01, 100.0), normalize="pixels")
    assert torch.allclose(by_pixels, torch.tensor([5 / 9, 10 / 9, 10 / 3]), atol=1e-6)
    assert torch.allclose((by_pixels * counts).sum() / counts.sum(), torch.tensor(1.0))
    by_classes = class_weights(counts, alpha=1.0, clip=(0.01, 100.0), normalize="classes")
    assert torch.allclose(by_classes, torch.tensor([5 / 9, 10 / 9, 10 / 3]) / (5 / 3), atol=1e-6)


def test_unknown_normalisation_is_rejected():
    with pytest.raises(ValueError, match="normalize"):
        class_weights(torch.tensor([1.0, 2.0]), normalize="median")
