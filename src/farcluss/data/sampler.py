"""Deterministic, resumable sample streams for training and sharded evaluation.

Training draws from :class:`InfiniteSampler`, an endless stream of ``(index, sample_seed)``
pairs. Epoch ``e`` is the permutation drawn from ``np.random.default_rng([seed, e])``, the same
on every rank; it is padded by wrapping to a multiple of the world size and rank ``r`` takes
positions ``r, r + W, r + 2W, …``. Each item's augmentation seed is a function of
``(seed, e, position)`` only, so the stream — indices and crops — is fixed by the run seed, and
resuming after ``k`` items per rank is ``start=k``, computed in O(1) without replaying.
"""

from __future__ import annotations

import math
from typing import Iterator, List, Tuple

import numpy as np
from torch.utils.data import Sampler


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """A 63-bit augmentation seed for the item at ``position`` of ``epoch`` (fits an int64)."""
    state = np.random.SeedSequence([seed, epoch, position]).generate_state(1, np.uint64)[0]
    return int(state >> np.uint64(1))


class InfiniteSampler(Sampler):
    """An endless, rank-sharded stream of ``(dataset index, augmentation seed)`` pairs.

    Plugs into ``DataLoader(dataset, batch_size=..., sampler=...)``; the dataset receives the
    pairs as items. ``start`` is the number of items this rank has already consumed.
    """

    def __init__(
        self,
        dataset_len: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        start: int = 0,
    ):
        super().__init__()
        if dataset_len < 1:
            raise ValueError(f"dataset_len must be positive, got {dataset_len}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, world_size={world_size})")
        if start < 0:
            raise ValueError(f"start must be non-negative, got {start}")
        self.dataset_len = dataset_len
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.start = start

    @property
    def items_per_epoch(self) -> int:
        """Items each rank draws per epoch: ``ceil(dataset_len / world_size)``."""
        return math.ceil(self.dataset_len / self.world_size)

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """This rank's dataset indices for ``epoch``, in stream order."""
        total = self.items_per_epoch * self.world_size
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.dataset_len)
        else:
            order = np.arange(self.dataset_len)
        # np.resize repeats the order cyclically: the wrap-around padding of the last positions.
        return np.resize(order, total)[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        epoch, offset = divmod(self.start, self.items_per_epoch)
        while True:
            indices = self.epoch_indices(epoch)
            for local in range(offset, len(indices)):
                position = self.rank + local * self.world_size
                yield int(indices[local]), sample_seed(self.seed, epoch, position)
            epoch, offset = epoch + 1, 0


def shard_indices(dataset_len: int, rank: int = 0, world_size: int = 1) -> List[int]:
    """Rank ``r``'s evaluation indices ``r, r + W, …``: every index on exactly one rank."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, world_size={world_size})")
    return list(range(rank, dataset_len, world_size))


class EvalSampler(Sampler):
    """Sharded evaluation order without padding, so an all-reduced confusion matrix counts each
    image once (``DistributedSampler`` pads with duplicates)."""

    def __init__(self, dataset_len: int, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.indices = shard_indices(dataset_len, rank, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
