"""Cityscapes label ids → the 19 training ids, and the one-off conversion of ``gtFine``.

The mapping is the official one of ``cityscapesScripts/helpers/labels.py``: 19 of the 34 label
ids are evaluated classes, every other id (void, rare and unlabeled classes) becomes 255.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image

from farcluss.data.io import open_decoded
from farcluss.errors import DataError
from farcluss.log import Progress

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)  # fmt: skip

IGNORE_TRAIN_ID = 255

# label id → train id for the evaluated classes; label ids 0–33 not listed here are ignored.
LABEL_ID_TO_TRAIN_ID = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
    24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip

_LOOKUP = np.full(256, IGNORE_TRAIN_ID, dtype=np.uint8)
for _label_id, _train_id in LABEL_ID_TO_TRAIN_ID.items():
    _LOOKUP[_label_id] = _train_id


def label_ids_to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """Map an array of Cityscapes label ids to train ids (uint8, 255 for ignored ids)."""
    label_ids = np.asarray(label_ids)
    in_table = (label_ids >= 0) & (label_ids < len(_LOOKUP))
    train_ids = np.full(label_ids.shape, IGNORE_TRAIN_ID, dtype=np.uint8)
    train_ids[in_table] = _LOOKUP[label_ids[in_table]]
    return train_ids


def convert_cityscapes(root: Union[str, Path], progress: bool = True) -> int:
    """Write ``*_labelTrainIds.png`` next to every ``*_labelIds.png`` under ``root/gtFine``.

    Existing train-id files are overwritten. Returns the number of files written.
    """
    gt_dir = Path(root) / "gtFine"
    if not gt_dir.is_dir():
        raise DataError(f"{gt_dir} not found (expected the Cityscapes root holding gtFine/)")
    label_files = sorted(gt_dir.rglob("*_labelIds.png"))
    if not label_files:
        raise DataError(f"no *_labelIds.png files under {gt_dir}")
    suffix = "_labelIds.png"
    with Progress(len(label_files), desc="labelIds -> labelTrainIds",
                  every=max(1, len(label_files) // 10), enabled=progress) as bar:
        for label_file in label_files:
            label_image = open_decoded(label_file, "label image")
            if len(label_image.getbands()) != 1:
                raise DataError(
                    f"label image {label_file} has mode {label_image.mode}; expected label ids (L)"
                )
            train_ids = label_ids_to_train_ids(np.asarray(label_image))
            target = label_file.with_name(label_file.name[: -len(suffix)] + "_labelTrainIds.png")
            Image.fromarray(train_ids).save(target)
            bar.update(1)
    return len(label_files)
