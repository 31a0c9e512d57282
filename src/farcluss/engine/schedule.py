"""The schedule length: `train.epochs` turned into `train.iterations` once the data is known."""

from __future__ import annotations

import math
from typing import List, Tuple

from farcluss.config import Config, derive_config
from farcluss.data.build import DataBundle
from farcluss.errors import ConfigError
from farcluss.log import get_logger
from farcluss.methods import METHODS

logger = get_logger(__name__)


def epoch_stream(cfg: Config, data: DataBundle) -> Tuple[str, int, int]:
    """(name, images, per-process batch) of the stream an epoch counts: the unlabeled images
    (at the unlabeled batch size) for a method that reads them, and for a supervised run whose
    data has an unlabeled list (`build_data` reads it then), so that every method compared on
    one config runs the same number of iterations; the labeled images otherwise."""
    if METHODS[cfg.method.name].uses_unlabeled or data.unlabeled:
        return "unlabeled", len(data.unlabeled), cfg.train.unlabeled_batch_size or cfg.train.batch_size
    return "labeled", len(data.labeled), cfg.train.batch_size


def epoch_iterations(epochs: float, images: int, batch_size: int, world_size: int) -> int:
    """ceil(epochs × images / (batch_size × world_size)), at least 1."""
    return max(1, math.ceil(epochs * images / (batch_size * world_size) - 1e-9))


def with_epoch_schedule(cfg: Config, data: DataBundle, world_size: int = 1,
                        log: bool = True) -> Config:
    """`cfg` itself without `train.epochs`; else a copy whose `train.iterations` is the epochs'
    iteration count (epochs wins over an explicit `train.iterations`). One info line says so,
    and one more names the eval/checkpoint intervals longer than the run (they then happen at
    the end only, as at every run's end)."""
    t = cfg.train
    if t.epochs is None:
        return cfg
    stream, images, batch_size = epoch_stream(cfg, data)
    if images == 0:
        raise ConfigError(f"config key 'train.epochs' needs {stream} images, but the "
                          f"{stream} list is empty")
    iterations = epoch_iterations(t.epochs, images, batch_size, world_size)
    if log:
        replaced = "" if iterations == t.iterations else f", replacing train.iterations={t.iterations}"
        per_step = f"{batch_size} × {world_size}" if world_size > 1 else f"{batch_size}"
        logger.info(f"train.epochs={t.epochs:g} over {images} {stream} images → {iterations} "
                    f"iterations (batch {per_step}{replaced})")
        longer: List[str] = [f"train.{name}={getattr(t, name)}" for name in
                             ("eval_interval", "checkpoint_interval")
                             if getattr(t, name) > iterations]
        if longer:
            logger.info(f"{' and '.join(longer)} exceed the {iterations} iterations: "
                        "that happens at the end of the run only")
    return derive_config(cfg, {"train.iterations": iterations})
