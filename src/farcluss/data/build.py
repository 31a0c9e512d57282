"""From a validated config to the class list, the sample lists and the evaluation loaders."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Literal, Optional

import torch
from torch.utils.data import DataLoader

from farcluss.config import Config
from farcluss.data.benchmark import benchmark_is_complete, default_benchmark_dir, make_benchmark
from farcluss.data.digits import default_digits_dir, digits_is_complete, make_digits
from farcluss.data.datasets import SegmentationDataset, read_classes, resolve_preset
from farcluss.data.sampler import EvalSampler
from farcluss.data.splits import Sample, duplicates_between, read_split
from farcluss.data.transforms import EvalTransform
from farcluss.errors import ConfigError
from farcluss.log import get_logger

logger = get_logger(__name__)


@dataclass
class DataBundle:
    root: Path
    classes: List[str]
    labeled: List[Sample]
    unlabeled: List[Sample]
    val: List[Sample]
    #: held-back test samples (``data.test``); empty when the config has none
    test: List[Sample] = field(default_factory=list)


BUILTIN_BENCHMARK = "builtin:benchmark"
BUILTIN_DIGITS = "builtin:digits"


#: `data.root` value → (name in the log line, cache folder, completeness check, generator)
BUILTIN_DATASETS = {
    BUILTIN_BENCHMARK: ("benchmark", default_benchmark_dir, benchmark_is_complete, make_benchmark),
    BUILTIN_DIGITS: ("digits", default_digits_dir, digits_is_complete, make_digits),
}


def dataset_root(cfg: Config) -> Path:
    """`data.root`, where ``builtin:benchmark`` and ``builtin:digits`` name the built-in datasets
    (made on first use in the farcluss cache)."""
    if not cfg.data.root:
        raise ConfigError("config key 'data.root' is empty: set it to the dataset folder")
    builtin = BUILTIN_DATASETS.get(cfg.data.root)
    if builtin is not None:
        name, default_dir, is_complete, make = builtin
        path = default_dir()
        if not is_complete(path):
            logger.info("making the built-in %s dataset in %s (once)", name, path)
            make(path)
        return path
    return Path(cfg.data.root).expanduser()


def _split_path(root: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else root / path


def resolve_classes(cfg: Config, root: Path) -> List[str]:
    """Class names from `data.classes` (a list or a file under `root`), else from the preset."""
    d = cfg.data
    if isinstance(d.classes, list):
        return read_classes(d.classes, d.num_classes)
    if isinstance(d.classes, str) and d.classes:
        return read_classes(_split_path(root, d.classes), d.num_classes)
    if d.preset == "folder":
        return read_classes(root / "classes.txt", d.num_classes)
    return read_classes(list(resolve_preset(d.preset, root).classes), d.num_classes)


def build_data(cfg: Config, need_unlabeled: Optional[bool] = None, need_train: bool = True) -> DataBundle:
    """Read classes and split lists (files are checked lazily, when a sample is loaded)."""
    d = cfg.data
    # resolved once: for the built-in benchmark it scans (and may first build) the dataset
    root = dataset_root(cfg)
    classes = resolve_classes(cfg, root)
    uses_unlabeled = cfg.method.name != "supervised"
    if need_unlabeled is None:
        # a supervised run with train.epochs counts them over the unlabeled list when there is
        # one (engine/schedule.py), so every method of a comparison runs as many iterations
        need_unlabeled = uses_unlabeled or (
            cfg.train.epochs is not None and _split_path(root, d.unlabeled).is_file())
    labeled = read_split(_split_path(root, d.labeled), root, require_mask=True) if need_train else []
    unlabeled = (read_split(_split_path(root, d.unlabeled), root, require_mask=False)
                 if need_train and need_unlabeled else [])
    val = read_split(_split_path(root, d.val), root, require_mask=True)
    test = read_split(_split_path(root, d.test), root, require_mask=True) if d.test else []
    if labeled and unlabeled and uses_unlabeled:
        duplicated = duplicates_between(labeled, unlabeled)
        if duplicated:
            logger.warning("%d image(s) are in both %s and %s, e.g. %s", len(duplicated),
                           d.labeled, d.unlabeled, duplicated[0])
    return DataBundle(root, classes, labeled, unlabeled, val, test)


EvalSplit = Literal["val", "test"]
EVAL_SPLITS = ("val", "test")


def eval_samples(cfg: Config, data: DataBundle, split: EvalSplit = "val") -> List[Sample]:
    """The samples of an evaluation split: ``val``, or ``test`` (ConfigError when ``data.test``
    is not set)."""
    if split not in EVAL_SPLITS:
        raise ConfigError(f"unknown evaluation split '{split}' (choose from {', '.join(EVAL_SPLITS)})")
    if split == "test" and not cfg.data.test:
        raise ConfigError("config key 'data.test' is not set: there is no test split to evaluate")
    return data.test if split == "test" else data.val


def val_dataset(cfg: Config, data: DataBundle, num_classes: int,
                split: EvalSplit = "val") -> SegmentationDataset:
    """The evaluation dataset of `split` (``val`` or ``test``), the first ``eval.max_images``."""
    d = cfg.data
    samples = eval_samples(cfg, data, split)
    if cfg.eval.max_images is not None:
        samples = samples[: cfg.eval.max_images]
    return SegmentationDataset(samples, num_classes, d.ignore_index,
                               EvalTransform(mean=d.mean, std=d.std), mode="val")


def eval_loader(cfg: Config, data: DataBundle, num_classes: int, env,
                split: EvalSplit = "val") -> DataLoader:
    """Batch-1 loader of `split` (``val`` or ``test``), sharded over the ranks."""
    dataset = val_dataset(cfg, data, num_classes, split)
    sampler = EvalSampler(len(dataset), rank=env.rank, world_size=env.world_size)
    workers = min(cfg.train.num_workers, 2)
    # a private generator for the worker seeds: evaluating must not advance the global torch
    # stream, or a run evaluated at other iterations (or resumed) would draw other dropout masks
    return DataLoader(dataset, batch_size=1, sampler=sampler, num_workers=workers,
                      generator=torch.Generator().manual_seed(0))
