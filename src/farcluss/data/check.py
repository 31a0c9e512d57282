"""Scan a split up front: every problem a training run would hit later, as one line each."""

from __future__ import annotations

from typing import List, Sequence

from tqdm import tqdm

from farcluss.data.io import check_same_size, load_image, load_mask
from farcluss.data.splits import Sample
from farcluss.errors import DataError


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
    for sample in tqdm(samples, desc="checking", unit="sample", disable=not progress):
        try:
            image = load_image(sample.image)
        except DataError as error:
            problems.append(str(error))
            image = None
        if not require_mask:
            continue
        if sample.mask is None:
            problems.append(f"labeled sample {sample.image} has no mask")
            continue
        try:
            mask = load_mask(sample.mask, num_classes, ignore_index)
            if image is not None:
                check_same_size(image, mask, sample.image, sample.mask)
        except DataError as error:
            problems.append(str(error))
    return problems
