"""Feature perturbations (UniMatch V1's dropout copy, V2's complementary masks) by hand."""

import pytest
import torch

from farcluss.methods.perturbation import (ComplementaryDropout, DropoutCopy,
                                           channel_dropout_masks, complementary_channel_masks)


def test_channel_dropout_masks_by_hand():
    uniform = torch.tensor([[0.1, 0.7, 0.5, 0.49, 0.9]], dtype=torch.float64)
    low, high = channel_dropout_masks(uniform, [2, 3], drop_prob=0.5)
    # u < p → dropped; kept channels scaled by 1/(1 − p) = 2
    assert torch.equal(low, torch.tensor([[0.0, 2.0]]))
    assert torch.equal(high, torch.tensor([[2.0, 0.0, 2.0]]))


def test_complementary_masks_by_hand_sum_to_two_and_leave_unperturbed_pairs_at_one():
    # column 0: is the pair left alone (u < keep_prob)? then one column per channel
    uniform = torch.tensor([[0.9, 0.2, 0.6, 0.5],
                            [0.1, 0.2, 0.6, 0.5]], dtype=torch.float64)
    (first,), (second,) = complementary_channel_masks(uniform, [3], keep_prob=0.5)
    assert torch.equal(first, torch.tensor([[0.0, 2.0, 2.0], [1.0, 1.0, 1.0]]))
    assert torch.equal(second, torch.tensor([[2.0, 0.0, 0.0], [1.0, 1.0, 1.0]]))
    assert torch.equal(first + second, torch.full((2, 3), 2.0))


def test_complementary_dropout_covers_every_channel_once_between_the_two_views():
    n, plain, channels = 3, 2, 64
    seeds = torch.tensor([7, 8, 9])
    features = [torch.rand(plain + 2 * n, 16, 4, 4) + 0.1, torch.rand(plain + 2 * n, channels, 2, 2) + 0.1]
    # the same features in both views, so the two outputs can be compared channel by channel
    for f in features:
        f[plain + n:] = f[plain:plain + n]
    out = ComplementaryDropout(seeds, offset=5, plain_rows=plain, keep_prob=0.0)(features)
    for f, o in zip(features, out):
        assert torch.equal(o[:plain], f[:plain])  # the labeled rows are left alone
        view1, view2 = o[plain:plain + n], o[plain + n:]
        kept1 = view1.flatten(2).ne(0).all(dim=2)
        kept2 = view2.flatten(2).ne(0).all(dim=2)
        assert torch.equal(kept1, ~kept2)  # each channel in exactly one view
        assert torch.allclose(view1 + view2, 2 * f[plain:plain + n])
        assert 0.25 < kept1.float().mean() < 0.75
    # keep_prob = 1: every pair unperturbed, the features pass unchanged
    same = ComplementaryDropout(seeds, offset=5, plain_rows=plain, keep_prob=1.0)(features)
    for f, o in zip(features, same):
        assert torch.equal(o, f)


def test_complementary_dropout_refuses_a_batch_that_is_not_plain_plus_two_views():
    perturb = ComplementaryDropout(torch.tensor([1, 2]), offset=0, plain_rows=1, keep_prob=0.5)
    with pytest.raises(ValueError, match="expected 5 rows"):
        perturb([torch.ones(4, 2, 2, 2), torch.ones(4, 2, 1, 1)])


def test_dropout_copy_appends_dropped_copies_whose_masks_follow_each_images_seed():
    features = [torch.rand(2, 16, 4, 4) + 0.1, torch.rand(2, 32, 2, 2) + 0.1]
    out = DropoutCopy(torch.tensor([3, 4]), offset=2, drop_prob=0.5)(features)
    for f, o in zip(features, out):
        assert o.shape[0] == 4
        assert torch.equal(o[:2], f)  # the clean rows are untouched
        ratio = o[2:] / f
        assert ((ratio == 0) | torch.isclose(ratio, torch.tensor(2.0))).all()
    # image 4's mask is the same whatever image shares its batch
    alone = DropoutCopy(torch.tensor([4]), offset=2, drop_prob=0.5)([f[1:] for f in features])
    for o, a in zip(out, alone):
        assert torch.equal(o[3:], a[1:])
