"""The segmentation dataset and the dataset presets (folder, Pascal VOC, Cityscapes)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from farcluss.data.cityscapes import CITYSCAPES_CLASSES
from farcluss.data.io import check_same_size, load_image, load_mask
from farcluss.data.splits import Sample
from farcluss.data.transforms import EvalTransform, WeakAugment
from farcluss.errors import ConfigError, DataError

MODES = ("labeled", "unlabeled", "val")

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip


class SegmentationDataset(Dataset):
    """Samples → dicts of tensors for one of three roles.

    - ``"labeled"``: ``{"image", "mask", "name"}``, weakly augmented;
    - ``"unlabeled"``: ``{"image", "ignore_mask", "name"}``, weakly augmented, the mask is never
      read (the strong view is made from this weak view on the training device);
    - ``"val"``: ``{"image", "mask", "name"}``, the full image, no randomness.

    In the training modes an item is ``(index, seed)`` from
    :class:`~farcluss.data.sampler.InfiniteSampler`, and the augmentation draws from
    ``np.random.default_rng(seed)``: a sample's crop depends only on its stream position, so
    resuming replays it exactly without worker state. A bare ``index`` draws fresh OS entropy
    (for inspection only; training always goes through the sampler).
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        num_classes: int,
        ignore_index: int,
        transform: Union[WeakAugment, EvalTransform],
        mode: str,
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "val" and not isinstance(transform, EvalTransform):
            raise ValueError("mode 'val' takes an EvalTransform")
        if mode != "val" and not isinstance(transform, WeakAugment):
            raise ValueError(f"mode {mode!r} takes a WeakAugment")
        if not samples:
            raise DataError(f"the {mode} dataset has no samples")
        if mode != "unlabeled":
            maskless = [sample.image for sample in samples if sample.mask is None]
            if maskless:
                raise DataError(f"{mode} sample {maskless[0]} has no mask")
        self.samples = list(samples)
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.transform = transform
        self.mode = mode

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, sample: Sample, with_mask: bool):
        image = load_image(sample.image)
        if not with_mask:
            return image, None
        mask = load_mask(sample.mask, self.num_classes, self.ignore_index)
        check_same_size(image, mask, sample.image, sample.mask)
        return image, mask

    def __getitem__(self, item: Union[int, Tuple[int, int]]) -> Dict[str, Union[torch.Tensor, str]]:
        index, seed = item if isinstance(item, tuple) else (item, None)
        sample = self.samples[index]
        image, mask = self._load(sample, with_mask=self.mode != "unlabeled")

        if self.mode == "val":
            image_tensor, mask_tensor = self.transform(image, mask)
            return {"image": image_tensor, "mask": mask_tensor, "name": sample.name}

        rng = np.random.default_rng(seed)
        image_tensor, mask_tensor, ignore_mask = self.transform(image, mask, rng)
        if self.mode == "labeled":
            return {"image": image_tensor, "mask": mask_tensor, "name": sample.name}
        return {"image": image_tensor, "ignore_mask": ignore_mask, "name": sample.name}


def read_classes(
    source: Union[str, Path, Sequence[str]], num_classes: Optional[int] = None
) -> List[str]:
    """Class names from a file (one per line, blank lines skipped) or a list.

    When ``num_classes`` is given it must equal the number of names.
    """
    if isinstance(source, (str, Path)):
        path = Path(source)
        where = str(path)
        if not path.is_file():
            raise DataError(f"class list {path} not found")
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        names = [name for name in names if name]
    else:
        where = "the class list"
        names = [str(name).strip() for name in source]
        if any(not name for name in names):
            raise DataError("the class list has an empty name")
    if not names:
        raise DataError(f"{where} names no classes")
    duplicated = sorted(name for name, count in Counter(names).items() if count > 1)
    if duplicated:
        raise DataError(f"{where} repeats the class name '{duplicated[0]}'")
    if num_classes is not None and num_classes != len(names):
        raise DataError(f"{where} names {len(names)} classes but num_classes is {num_classes}")
    return names


@dataclass(frozen=True)
class DatasetSpec:
    """What a preset knows: its class names (masks and splits come from the split lists)."""

    name: str
    classes: Tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


PRESETS = ("folder", "voc", "voc_blended", "cityscapes")


def resolve_preset(name: str, root: Union[str, Path]) -> DatasetSpec:
    """The :class:`DatasetSpec` of preset ``name`` for the dataset at ``root``.

    - ``folder``: the classes of ``root/classes.txt``;
    - ``voc`` (classic, masks in ``SegmentationClass``) and ``voc_blended`` (SBD-augmented
      masks in ``SegmentationClassAug``): the 21 VOC classes;
    - ``cityscapes``: the 19 train-id classes, masks ``gtFine/**/*_labelTrainIds.png``
      (``farcluss data cityscapes`` converts the official label ids).
    """
    root = Path(root)
    if name not in PRESETS:
        raise ConfigError(f"unknown dataset preset {name!r} (choose from {', '.join(PRESETS)})")
    if not root.is_dir():
        raise DataError(f"dataset root {root} not found")
    if name == "folder":
        return DatasetSpec(name, tuple(read_classes(root / "classes.txt")))
    if name in ("voc", "voc_blended"):
        return DatasetSpec(name, VOC_CLASSES)
    return DatasetSpec(name, CITYSCAPES_CLASSES)
