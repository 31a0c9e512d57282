"""Split lists in the UniMatch format, and making new labeled/unlabeled/val splits.

A split file holds one sample per line, ``image_path mask_path``, paths relative to the dataset
root (absolute paths are accepted as they are). An unlabeled list may give the image alone; a
mask given in an unlabeled list is kept on the :class:`Sample` (a fully supervised baseline can
use it) but never loaded for unsupervised training. Blank lines and ``#`` comments are skipped.

Paths are not checked for existence here: images are opened lazily by the dataset, and
``farcluss check`` scans a whole list up front (:mod:`farcluss.data.check`).
"""

from __future__ import annotations

import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Union

import numpy as np

from farcluss import file_kind
from farcluss.errors import ConfigError, DataError

PathLike = Union[str, "os.PathLike[str]"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SPLIT_NAMES = ("labeled", "unlabeled", "val", "test")


@dataclass(frozen=True)
class Sample:
    """One image and, when labeled, its index mask."""

    image: Path
    mask: Optional[Path] = None

    @property
    def name(self) -> str:
        """The image file name without its suffix (used to name predictions and log rows)."""
        return self.image.stem


def _split_lines(path: Path) -> List[str]:
    """The lines of a split list; DataError when the file is not UTF-8 text (an image, …)."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise DataError(f"cannot read split file {path}: {error.strerror or error}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None or "\x00" in text:
        kind = file_kind.describe(raw[:file_kind.HEAD_BYTES])
        raise DataError(f"split file {path} is not a text file"
                        + (f" ({kind})" if kind else " (binary content)")
                        + "; expected lines of 'image [mask]'")
    return text.split("\n")


def read_split(path: PathLike, root: PathLike, require_mask: bool) -> List[Sample]:
    """Parse a UniMatch split list into samples whose paths are joined to ``root``.

    ``require_mask`` is true for labeled and validation lists: every line must then give a
    mask path. Errors raise :class:`DataError` naming ``file:line``.
    """
    path = Path(path)
    root = Path(root)
    if not path.is_file():
        raise DataError(f"split file {path} not found")
    samples: List[Sample] = []
    for line_number, line in enumerate(_split_lines(path), start=1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) > 2:
            raise DataError(
                f"{path}:{line_number}: expected 'image [mask]', got {len(fields)} fields "
                "(paths with spaces are not supported)"
            )
        if require_mask and len(fields) < 2:
            raise DataError(
                f"{path}:{line_number}: labeled line has no mask path (expected 'image mask')"
            )
        # Joining an absolute path to the root yields the absolute path unchanged.
        image = root / fields[0]
        mask = root / fields[1] if len(fields) == 2 else None
        samples.append(Sample(image=image, mask=mask))
    if not samples:
        raise DataError(f"split file {path} lists no samples")
    return samples


def _relative_to_root(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` when it lies under it, otherwise absolute (POSIX form)."""
    absolute = Path(os.path.abspath(path))
    try:
        return absolute.relative_to(os.path.abspath(root)).as_posix()
    except ValueError:
        return absolute.as_posix()


def write_split(path: PathLike, samples: Iterable[Sample], root: PathLike) -> Path:
    """Write samples as a UniMatch list, paths relative to ``root`` where possible."""
    path = Path(path)
    root = Path(root)
    rows = []
    for sample in samples:
        fields = [_relative_to_root(sample.image, root)]
        if sample.mask is not None:
            fields.append(_relative_to_root(sample.mask, root))
        if any(" " in field or "#" in field for field in fields):
            raise DataError(f"cannot write {sample.image} to {path}: a space or '#' in the path")
        rows.append(" ".join(fields))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(row + "\n" for row in rows), encoding="utf-8")
    return path


def duplicates_between(labeled: Sequence[Sample], unlabeled: Sequence[Sample]) -> List[Path]:
    """Images listed in both splits (a labeled image reused as unlabeled), sorted."""
    labeled_images = {Path(os.path.abspath(sample.image)) for sample in labeled}
    unlabeled_images = {Path(os.path.abspath(sample.image)) for sample in unlabeled}
    return sorted(labeled_images & unlabeled_images)


def _folder_samples(folder: Path) -> List[Sample]:
    """Pair ``folder/images/*`` with ``folder/masks/*`` by stem; unmatched images get no mask."""
    image_dir, mask_dir = folder / "images", folder / "masks"
    if not image_dir.is_dir():
        raise DataError(f"{image_dir} not found (a folder dataset has images/ and masks/)")

    def by_stem(directory: Path) -> Dict[str, Path]:
        found: Dict[str, Path] = {}
        if not directory.is_dir():
            return found
        for file in sorted(directory.iterdir()):
            if file.suffix.lower() not in IMAGE_SUFFIXES or not file.is_file():
                continue
            if file.stem in found:
                raise DataError(f"{found[file.stem]} and {file} share the stem '{file.stem}'")
            found[file.stem] = file
        return found

    images, masks = by_stem(image_dir), by_stem(mask_dir)
    if not images:
        raise DataError(f"{image_dir} holds no .png/.jpg/.jpeg images")
    return [Sample(image=image, mask=masks.get(stem)) for stem, image in sorted(images.items())]


def _count(value: Union[int, float], total: int, name: str) -> int:
    """An absolute count, or a ratio in (0, 1) of ``total`` rounded (at least 1)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name}={value!r}: expected a count (int) or a ratio in (0, 1)")
    if not isinstance(value, numbers.Integral):
        if not 0.0 < value < 1.0:
            raise ConfigError(f"{name}={value}: a ratio must lie in (0, 1)")
        return max(1, int(round(value * total)))
    if value < 1:
        raise ConfigError(f"{name}={value}: a count must be at least 1")
    return int(value)


def make_splits(
    out_dir: PathLike,
    *,
    source_list: Optional[PathLike] = None,
    folder: Optional[PathLike] = None,
    root: Optional[PathLike] = None,
    labeled: Union[int, float],
    seed: int = 0,
    val: Union[int, float, None] = None,
    test: Union[int, float, None] = None,
) -> Dict[str, Path]:
    """Shuffle a pool of samples with ``seed`` and write ``labeled.txt``, ``unlabeled.txt``
    and optionally ``val.txt`` and ``test.txt`` (the held-back split ``data.test`` names) into
    ``out_dir``.

    The pool is either a split list (``source_list``, paths relative to ``root``) or a folder
    layout (``folder/images`` and ``folder/masks`` matched by stem; ``root`` defaults to
    ``folder``). Only samples with a mask can become labeled or validation samples. ``val``
    (a count, or a ratio of the samples with a mask) is drawn first, then ``test`` (the same
    kinds; drawing it after val leaves a seed's val split unchanged), then ``labeled`` (a count,
    or a ratio of the remaining training pool); everything left is unlabeled, mask paths kept so
    a fully supervised baseline can use them. Returns the written paths by split name.
    """
    if (source_list is None) == (folder is None):
        raise ConfigError("make_splits needs exactly one of a source list or a folder")
    if folder is not None:
        root = Path(folder) if root is None else Path(root)
        pool = _folder_samples(Path(folder))
    else:
        if root is None:
            raise ConfigError(
                f"making splits from {source_list} needs the dataset root its paths are relative to"
            )
        root = Path(root)
        pool = read_split(source_list, root, require_mask=False)

    # One sample per image (an image listed twice keeps its mask), sorted so that the split
    # depends only on the pool's content and the seed, not on listing order.
    by_image: Dict[Path, Sample] = {}
    for sample in pool:
        if by_image.get(sample.image) is None or by_image[sample.image].mask is None:
            by_image[sample.image] = sample
    pool = [by_image[image] for image in sorted(by_image, key=str)]
    order = np.random.default_rng(seed).permutation(len(pool))
    shuffled = [pool[i] for i in order]
    with_mask = [s for s in shuffled if s.mask is not None]
    without_mask = [s for s in shuffled if s.mask is None]

    val_count = 0 if val is None else _count(val, len(with_mask), "val")
    test_count = 0 if test is None else _count(test, len(with_mask), "test")
    held_out = val_count + test_count
    train_total = len(pool) - held_out
    labeled_count = _count(labeled, train_total, "labeled")
    if held_out + labeled_count > len(with_mask):
        raise DataError(
            f"{val_count} val + {test_count} test + {labeled_count} labeled samples requested, "
            f"but only {len(with_mask)} of {len(pool)} samples have a mask"
        )
    if labeled_count >= train_total:
        raise DataError(
            f"labeled={labeled} takes all {train_total} training samples and leaves none unlabeled"
        )

    splits = {
        "val": with_mask[:val_count],
        "test": with_mask[val_count:held_out],
        "labeled": with_mask[held_out : held_out + labeled_count],
        "unlabeled": with_mask[held_out + labeled_count :] + without_mask,
    }
    out_dir = Path(out_dir)
    written: Dict[str, Path] = {}
    for name in SPLIT_NAMES:
        if (name == "val" and val is None) or (name == "test" and test is None):
            continue
        # Sorted output keeps the files readable and diffable; the sampler does the shuffling.
        rows = sorted(splits[name], key=lambda s: str(s.image))
        written[name] = write_split(out_dir / f"{name}.txt", rows, root)
    return written
