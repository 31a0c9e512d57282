import math

import pytest
import torch
import torch.nn.functional as F

from farcluss.losses.contrastive import (
    contrastive_labels,
    downsample_labels,
    global_prototypes,
    prototype_contrastive_loss,
    prototype_sums,
    sample_pixels_per_class,
    update_prototype_bank,
)

IGNORE = 255


def _empty_bank(num_classes, dim):
    return torch.zeros(num_classes, dim), torch.zeros(num_classes, dtype=torch.bool)


def _loss(embeddings, labels, num_classes, bank=None, bank_initialized=None, temperature=0.1):
    if bank is None:
        bank, bank_initialized = _empty_bank(num_classes, embeddings.shape[1])
    sums, counts = prototype_sums(embeddings, labels, num_classes)
    prototypes, present = global_prototypes(sums, counts)
    return prototype_contrastive_loss(
        embeddings, labels, prototypes, present, bank, bank_initialized, temperature
    )


def test_prototype_sums_by_hand_skip_ignored_pixels():
    embeddings = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0], [9.0, 9.0]])
    labels = torch.tensor([0, 2, 0, IGNORE])
    sums, counts = prototype_sums(embeddings, labels, 3)
    assert torch.equal(sums, torch.tensor([[4.0, 3.0], [0.0, 0.0], [0.0, 2.0]]))
    assert counts.tolist() == [2.0, 0.0, 1.0]


def test_global_prototypes_are_normalised_means_of_all_ranks():
    sums = torch.tensor([[3.0, 0.0], [0.0, 0.0]], requires_grad=True)
    counts = torch.tensor([1.0, 0.0])
    other_rank_sums = torch.tensor([[0.0, 4.0], [0.0, 0.0]])
    other_rank_counts = torch.tensor([1.0, 0.0])

    def reduce(local):
        return local + (other_rank_sums if local.dim() == 2 else other_rank_counts)

    prototypes, present = global_prototypes(sums, counts, reduce)
    assert present.tolist() == [True, False]
    assert torch.allclose(prototypes, torch.tensor([[0.6, 0.8], [0.0, 0.0]]))
    prototypes[0, 0].backward()
    assert sums.grad.abs().sum() > 0


def test_orthogonal_prototypes_pull_by_hand_and_no_push():
    embeddings = torch.eye(3).repeat(2, 1)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    loss, stats = _loss(embeddings, labels, 3, temperature=0.1)
    expected_pull = -math.log(math.exp(10) / (math.exp(10) + 2))  # 9.08e-5
    assert stats["push"].item() == 0.0
    assert math.isclose(stats["pull"].item(), expected_pull, abs_tol=2e-6)
    assert math.isclose(loss.item(), expected_pull, abs_tol=2e-6)


def test_orthogonal_prototypes_at_unit_temperature_by_hand():
    loss, _ = _loss(torch.eye(3), torch.tensor([0, 1, 2]), 3, temperature=1.0)
    assert math.isclose(loss.item(), math.log(1 + 2 / math.e), rel_tol=1e-5)  # 0.551445


def test_bank_stands_in_for_absent_class_and_unseen_class_is_excluded():
    bank, bank_initialized = _empty_bank(4, 4)
    bank[2] = torch.tensor([0.0, 0.0, 1.0, 0.0])
    bank_initialized[2] = True
    embeddings = torch.eye(4)[:2]
    labels = torch.tensor([0, 1])
    # Classes 0, 1 from the batch, 2 from the bank, 3 seen nowhere: three in the softmax.
    loss, stats = _loss(embeddings, labels, 4, bank, bank_initialized, temperature=1.0)
    assert math.isclose(loss.item(), math.log(1 + 2 / math.e), rel_tol=1e-5)
    assert stats["num_prototypes"].item() == 3


def test_push_is_one_for_identical_prototypes():
    embeddings = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    _, stats = _loss(embeddings, torch.tensor([0, 1]), 2)
    assert math.isclose(stats["push"].item(), 1.0, rel_tol=1e-6)


def test_push_averages_over_ordered_pairs_of_available_prototypes():
    # μ0 = μ1 ⟂ μ2: 6 ordered pairs, two with overlap 1.
    embeddings = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    _, stats = _loss(embeddings, torch.tensor([0, 1, 2]), 3)
    assert math.isclose(stats["push"].item(), 1 / 3, rel_tol=1e-6)


def test_gradients_reach_embeddings_but_not_the_bank():
    torch.manual_seed(0)
    embeddings = F.normalize(torch.randn(12, 8), dim=1).requires_grad_(True)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, IGNORE, IGNORE, 0])
    bank = F.normalize(torch.randn(4, 8), dim=1).requires_grad_(True)
    bank_initialized = torch.tensor([True, True, True, True])
    loss, _ = _loss(embeddings, labels, 4, bank, bank_initialized)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    assert torch.isfinite(embeddings.grad).all()
    assert embeddings.grad[:9].abs().sum() > 0
    assert bank.grad is None


def test_ignored_pixels_do_not_count():
    base = torch.eye(3)
    with_ignored = torch.cat([base, torch.tensor([[0.0, 0.6, 0.8]])])
    loss_base, _ = _loss(base, torch.tensor([0, 1, 2]), 3)
    loss_ignored, _ = _loss(with_ignored, torch.tensor([0, 1, 2, IGNORE]), 3)
    assert torch.isclose(loss_base, loss_ignored)


@pytest.mark.parametrize("labels", [torch.zeros(0, dtype=torch.long), torch.full((5,), IGNORE)])
def test_no_usable_pixel_gives_zero_loss_with_gradient(labels):
    embeddings = torch.randn(labels.numel(), 4, requires_grad=True)
    loss, stats = _loss(embeddings, labels, 3)
    assert loss.item() == 0.0 and stats["num_prototypes"].item() == 0
    loss.backward()
    assert torch.isfinite(embeddings.grad).all()


def test_all_pixels_of_one_class_have_no_push_and_finite_pull():
    embeddings = F.normalize(torch.randn(10, 4), dim=1)
    loss, stats = _loss(embeddings, torch.full((10,), 2), 5)
    assert stats["push"].item() == 0.0
    assert stats["pull"].item() == 0.0  # the softmax has a single class
    assert torch.isfinite(loss)


def test_bank_takes_first_prototype_then_moving_average():
    bank, bank_initialized = _empty_bank(3, 2)
    batch = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    present = torch.tensor([True, True, False])
    bank, bank_initialized = update_prototype_bank(bank, bank_initialized, batch, present, 0.5)
    assert torch.equal(bank, batch)
    assert bank_initialized.tolist() == [True, True, False]

    new_batch = torch.tensor([[0.0, 1.0], [9.0, 9.0], [0.0, 0.0]])
    new_present = torch.tensor([True, False, False])
    bank, bank_initialized = update_prototype_bank(
        bank, bank_initialized, new_batch, new_present, 0.5
    )
    # Class 0: normalise(0.5·[1, 0] + 0.5·[0, 1]); class 1 absent, unchanged.
    half = 1 / math.sqrt(2)
    assert torch.allclose(bank, torch.tensor([[half, half], [0.0, 1.0], [0.0, 0.0]]))
    assert bank_initialized.tolist() == [True, True, False]


def test_bank_update_does_not_track_gradients():
    batch = torch.eye(2).requires_grad_(True)
    bank, _ = update_prototype_bank(*_empty_bank(2, 2), batch, torch.tensor([True, True]))
    assert not bank.requires_grad


def test_sampling_caps_each_class_and_skips_ignored_pixels():
    labels = torch.tensor([0] * 10 + [1] * 3 + [IGNORE] * 5)[torch.randperm(18)]
    picked = sample_pixels_per_class(labels, 3, max_per_class=4)
    assert picked.unique().numel() == picked.numel()
    assert torch.bincount(labels[picked], minlength=3).tolist() == [4, 3, 0]


def test_sampling_matches_min_of_count_and_cap_on_a_larger_map():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (4, 16, 16), generator=generator)
    labels[1] = IGNORE
    labels[0, 0, :3] = 4  # a rare class with fewer pixels than the cap
    picked = sample_pixels_per_class(labels, 5, max_per_class=50, generator=generator)
    flat = labels.reshape(-1)
    available = torch.bincount(flat[flat != IGNORE], minlength=5)
    assert torch.equal(torch.bincount(flat[picked], minlength=5), available.clamp(max=50))


def test_sampling_is_reproducible_and_random():
    labels = torch.zeros(200, dtype=torch.long)

    def draw(seed):
        generator = torch.Generator().manual_seed(seed)
        return sample_pixels_per_class(labels, 1, 10, generator=generator)

    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1).sort().values, draw(2).sort().values)


def test_sampling_without_cap_keeps_every_labeled_pixel():
    labels = torch.tensor([2, IGNORE, 0, 2, 1])
    picked = sample_pixels_per_class(labels, 3, max_per_class=None)
    assert sorted(picked.tolist()) == [0, 2, 3, 4]


def test_sampling_rejects_a_cap_below_one():
    with pytest.raises(ValueError, match="max_per_class"):
        sample_pixels_per_class(torch.zeros(3, dtype=torch.long), 1, max_per_class=0)


def test_contrastive_labels_keep_confident_pseudo_labels_after_ground_truth():
    gt = torch.tensor([[[0, IGNORE], [1, 1]]])
    pseudo = torch.tensor([[[2, 2], [0, 1]]])
    weights = torch.tensor([[[0.9, 0.5], [0.6, 0.1]]])
    valid = torch.tensor([[[True, True], [False, True]]])
    labels = contrastive_labels(gt, pseudo, weights, weight_threshold=0.5, valid_mask=valid)
    expected = torch.tensor([[[0, IGNORE], [1, 1]], [[2, IGNORE], [IGNORE, IGNORE]]])
    assert torch.equal(labels, expected)
    # threshold 0 (the contrastive_all_pixels variant): every valid pixel but a uniform one
    weights[0, 0, 1] = 0.0
    labels = contrastive_labels(None, pseudo, weights, weight_threshold=0.0, valid_mask=valid)
    assert torch.equal(labels, torch.tensor([[[2, IGNORE], [IGNORE, 1]]]))


def test_downsample_labels_is_nearest_and_keeps_dtype():
    labels = torch.arange(16).view(1, 4, 4)
    labels[0, 2, 2] = IGNORE
    small = downsample_labels(labels, (2, 2))
    assert small.dtype == torch.long
    assert small.tolist() == [[[0, 2], [8, IGNORE]]]
