"""Class colours: palette PNGs of class indices and colour overlays.

A prediction is saved as an 8-bit palette ('P') PNG whose pixel values *are* the class indices
and whose palette only decides how viewers draw them, so ``np.array(Image.open(path))`` gives
the indices back and the file can serve directly as a mask (``farcluss.data.io.load_mask``
reads 'P' images as indices). Which colours:

- 21 classes: the Pascal VOC colour map (background black, aeroplane dark red, …);
- 19 classes: the official Cityscapes train-id colours;
- any other count: a generated palette of well separated colours, the same on every call.

Entry 255 (the ignore label) is drawn in VOC's light "void" colour in every palette.
"""

from __future__ import annotations

import colorsys
from pathlib import Path
from typing import Sequence, Union

import numpy as np
from PIL import Image

from farcluss.errors import DataError

PathLike = Union[str, Path]

#: the colour of the ignore label 255, as in VOC's own masks
IGNORE_COLOUR = (224, 224, 192)

#: cityscapesScripts ``helpers/labels.py`` colours of the 19 evaluated classes, in train-id order
CITYSCAPES_COLOURS = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32),
)  # fmt: skip

VOC_NUM_CLASSES = 21
CITYSCAPES_NUM_CLASSES = len(CITYSCAPES_COLOURS)
MAX_CLASSES = 255  # index 255 is the ignore label; a 'P' PNG holds 256 entries


def voc_colours(count: int) -> np.ndarray:
    """The first ``count`` colours of the Pascal VOC colour map, ``count × 3`` uint8.

    Class c's bits are dealt out to the channels from the most significant bit down: bit 3k of c
    sets bit (7 − k) of red, bit 3k+1 of green, bit 3k+2 of blue. So 1 → (128, 0, 0),
    2 → (0, 128, 0), 3 → (128, 128, 0), 4 → (0, 0, 128), …, 15 (person) → (192, 128, 128).
    """
    colours = np.zeros((count, 3), dtype=np.uint8)
    for index in range(count):
        value = index
        for shift in range(7, -1, -1):
            for channel in range(3):
                colours[index, channel] |= ((value >> channel) & 1) << shift
            value >>= 3
            if value == 0:
                break
    return colours


def distinct_colours(count: int) -> np.ndarray:
    """``count × 3`` uint8 colours whose hues step by the golden angle (≈ 137.5°).

    Consecutive classes land far apart on the colour wheel and no two hues repeat; value and
    saturation cycle over three levels so that classes whose hues end up close still differ in
    brightness. Deterministic: the same count gives the same colours.
    """
    golden_fraction = 0.618033988749895
    levels = ((0.90, 0.65), (0.65, 0.95), (0.80, 0.45))  # (value, saturation)
    colours = np.zeros((count, 3), dtype=np.uint8)
    for index in range(count):
        hue = (index * golden_fraction) % 1.0
        value, saturation = levels[index % len(levels)]
        red, green, blue = colorsys.hsv_to_rgb(hue, saturation, value)
        colours[index] = np.round(np.array([red, green, blue]) * 255)
    return colours


def class_colours(num_classes: int) -> np.ndarray:
    """``num_classes × 3`` uint8 colours: VOC for 21 classes, Cityscapes for 19, else generated."""
    if not 1 <= num_classes <= MAX_CLASSES:
        raise DataError(f"cannot colour {num_classes} classes: a palette PNG holds "
                        f"1..{MAX_CLASSES}")
    if num_classes == VOC_NUM_CLASSES:
        return voc_colours(num_classes)
    if num_classes == CITYSCAPES_NUM_CLASSES:
        return np.array(CITYSCAPES_COLOURS, dtype=np.uint8)
    return distinct_colours(num_classes)


def png_palette(num_classes: int) -> np.ndarray:
    """The 256 × 3 uint8 palette of a prediction PNG: class colours, then black, 255 = ignore."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    palette[:num_classes] = class_colours(num_classes)
    palette[255] = IGNORE_COLOUR
    return palette


def _check_indices(indices: np.ndarray) -> np.ndarray:
    indices = np.asarray(indices)
    if indices.ndim != 2:
        raise ValueError(f"class indices must be H×W, got shape {indices.shape}")
    if indices.size and (indices.min() < 0 or indices.max() > 255):
        raise ValueError("class indices must lie in 0..255 to fit a palette PNG")
    return indices.astype(np.uint8, copy=False)


def index_image(indices: np.ndarray, num_classes: int) -> Image.Image:
    """An H×W array of class indices as a 'P' image whose pixel values are the indices."""
    image = Image.fromarray(_check_indices(indices))  # 'L'; putpalette makes it 'P', values kept
    image.putpalette(png_palette(num_classes).tobytes())
    return image


def save_index_png(path: PathLike, indices: np.ndarray, num_classes: int) -> None:
    """Write class indices as a palette PNG (read back with ``np.array(Image.open(path))``)."""
    index_image(indices, num_classes).save(path, format="PNG")


def colorize(indices: np.ndarray, num_classes: int) -> np.ndarray:
    """H×W class indices → H×W×3 uint8 colours of the prediction palette."""
    return png_palette(num_classes)[_check_indices(indices)]


def overlay(image: Union[Image.Image, np.ndarray], indices: np.ndarray, num_classes: int,
            alpha: float = 0.5) -> Image.Image:
    """The RGB image blended with the class colours: out = (1 − α)·image + α·colour."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image,
                        dtype=np.float32)
    colours = colorize(indices, num_classes).astype(np.float32)
    if pixels.shape != colours.shape:
        raise ValueError(f"image {pixels.shape[:2]} and indices {colours.shape[:2]} differ in size")
    blended = (1.0 - alpha) * pixels + alpha * colours
    return Image.fromarray(np.clip(np.round(blended), 0, 255).astype(np.uint8))


def legend(class_names: Sequence[str]) -> str:
    """One ``index  name  #rrggbb`` line per class, for a key beside the prediction PNGs."""
    colours = class_colours(len(class_names))
    return "\n".join(f"{index}\t{name}\t#{r:02x}{g:02x}{b:02x}"
                     for index, (name, (r, g, b)) in enumerate(zip(class_names, colours)))
