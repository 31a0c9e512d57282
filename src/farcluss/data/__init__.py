"""Data: split lists, image/mask loading, weak augmentation, datasets, presets and samplers."""

from farcluss.data.check import check_samples
from farcluss.data.cityscapes import CITYSCAPES_CLASSES, convert_cityscapes, label_ids_to_train_ids
from farcluss.data.datasets import (
    VOC_CLASSES,
    DatasetSpec,
    SegmentationDataset,
    read_classes,
    resolve_preset,
)
from farcluss.data.io import load_image, load_mask
from farcluss.data.sampler import EvalSampler, InfiniteSampler, shard_indices
from farcluss.data.splits import Sample, duplicates_between, make_splits, read_split, write_split
from farcluss.data.transforms import EvalTransform, WeakAugment, denormalize, normalize

__all__ = [
    "CITYSCAPES_CLASSES",
    "VOC_CLASSES",
    "DatasetSpec",
    "EvalSampler",
    "EvalTransform",
    "InfiniteSampler",
    "Sample",
    "SegmentationDataset",
    "WeakAugment",
    "check_samples",
    "convert_cityscapes",
    "denormalize",
    "duplicates_between",
    "label_ids_to_train_ids",
    "load_image",
    "load_mask",
    "make_splits",
    "normalize",
    "read_classes",
    "read_split",
    "resolve_preset",
    "shard_indices",
    "write_split",
]
