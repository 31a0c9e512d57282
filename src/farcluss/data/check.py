"""Scan a split up front: every problem a training run would hit later, as one line each."""

from __future__ import annotations

from typing import List, Sequence

from farcluss.data.io import check_same_size, load_image, load_mask
from farcluss.data.splits import Sample
from farcluss.errors import DataError
from farcluss.log import Progress


def check_samples(
    samples: Sequence[Sample],
    num_classes: int,
    ignore_index: int,
    require_mask: bool,
    progress: bool = False,
) -> List[str]:
    """Load every image (and, when ``require_mask``, every mask) and collect the problems.

    Reports missing, corrupt or truncated files, colour masks, out-of-range mask values and
    mask/image size mismatches, one line per sample and file, instead of stopping at the first.
    Masks listed in an unlabeled split (``require_mask=False``) are not read, as in training.
    """
    problems: List[str] = []
    with Progress(len(samples), desc="checking", every=max(1, len(samples) // 10),
                  enabled=progress) as bar:
        for sample in samples:
            problems.extend(_sample_problems(sample, num_classes, ignore_index, require_mask))
            bar.update(1)
    return problems


def _sample_problems(sample: Sample, num_classes: int, ignore_index: int,
                     require_mask: bool) -> List[str]:
    """The problems of one sample's image (and mask), one line each."""
    problems: List[str] = []
    try:
        image = load_image(sample.image)
    except DataError as error:
        problems.append(str(error))
        image = None
    if not require_mask:
        return problems
    if sample.mask is None:
        problems.append(f"labeled sample {sample.image} has no mask")
        return problems
    try:
        mask = load_mask(sample.mask, num_classes, ignore_index)
        if image is not None:
            check_same_size(image, mask, sample.image, sample.mask)
    except DataError as error:
        problems.append(str(error))
    return problems
