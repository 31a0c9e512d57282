from itertools import islice

import numpy as np
import pytest

from farcluss.data.sampler import EvalSampler, InfiniteSampler, sample_seed, shard_indices


def take(sampler, count):
    return list(islice(iter(sampler), count))


def test_stream_is_deterministic_and_each_epoch_is_a_permutation():
    first = take(InfiniteSampler(7, seed=5), 21)
    assert first == take(InfiniteSampler(7, seed=5), 21)
    assert [i for i, _ in first] != [i for i, _ in take(InfiniteSampler(7, seed=6), 21)]
    for epoch in range(3):
        indices = [index for index, _ in first[7 * epoch : 7 * (epoch + 1)]]
        assert sorted(indices) == list(range(7))
    # Epoch e is the permutation of default_rng([seed, e]).
    assert [i for i, _ in first[7:14]] == np.random.default_rng([5, 1]).permutation(7).tolist()
    seeds = [seed for _, seed in first]
    assert len(set(seeds)) == 21 and all(0 <= seed < 2**63 for seed in seeds)


def test_without_shuffle_the_order_is_sequential():
    stream = take(InfiniteSampler(3, seed=0, shuffle=False), 7)
    assert [index for index, _ in stream] == [0, 1, 2, 0, 1, 2, 0]


def test_ranks_split_each_epoch_disjointly_and_pad_by_wrapping():
    world_size, length = 3, 10  # 4 items per rank per epoch; 2 padded positions
    per_rank = [
        take(InfiniteSampler(length, seed=1, rank=rank, world_size=world_size), 4)
        for rank in range(world_size)
    ]
    permutation = np.random.default_rng([1, 0]).permutation(length).tolist()
    padded = permutation + permutation[:2]
    for rank, items in enumerate(per_rank):
        assert [index for index, _ in items] == padded[rank::world_size]
    all_indices = [index for items in per_rank for index, _ in items]
    assert sorted(set(all_indices)) == list(range(length))
    # The first 10 stream positions cover every index exactly once; only padding repeats.
    interleaved = [per_rank[p % world_size][p // world_size][0] for p in range(length)]
    assert sorted(interleaved) == list(range(length))
    # Seeds come from the global position, so no two ranks share one.
    assert len({seed for items in per_rank for _, seed in items}) == 12


def test_start_offset_equals_skipping_items():
    for start in (0, 3, 4, 9, 25):
        full = take(InfiniteSampler(9, seed=2, rank=1, world_size=2), start + 6)
        resumed = take(InfiniteSampler(9, seed=2, rank=1, world_size=2, start=start), 6)
        assert resumed == full[start:]


def test_sample_seed_is_a_pure_function_of_seed_epoch_position():
    assert sample_seed(0, 1, 2) == sample_seed(0, 1, 2)
    assert len({sample_seed(0, 1, 2), sample_seed(0, 2, 1), sample_seed(1, 1, 2)}) == 3
    sampler = InfiniteSampler(4, seed=9)
    assert take(sampler, 6)[5][1] == sample_seed(9, 1, 1)


def test_world_size_larger_than_dataset_still_gives_every_rank_items():
    items = [take(InfiniteSampler(2, seed=0, rank=r, world_size=5), 1)[0][0] for r in range(5)]
    assert set(items) == {0, 1}


def test_invalid_arguments():
    with pytest.raises(ValueError):
        InfiniteSampler(0, seed=0)
    with pytest.raises(ValueError):
        InfiniteSampler(4, seed=0, rank=2, world_size=2)


def test_eval_sharding_counts_every_index_once():
    shards = [list(EvalSampler(10, rank=r, world_size=3)) for r in range(3)]
    assert shards == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert [len(EvalSampler(10, rank=r, world_size=3)) for r in range(3)] == [4, 3, 3]
    assert sorted(i for shard in shards for i in shard) == list(range(10))
    assert shard_indices(2, rank=1, world_size=4) == [1]
    assert shard_indices(2, rank=3, world_size=4) == []
