"""Loading images and index masks, with errors that name the offending file.

Every image is decoded in full on load (``Image.load()``), so a truncated or corrupt file fails
here with its path instead of deep inside a DataLoader worker.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from farcluss import file_kind
from farcluss.errors import DataError

PathLike = Union[str, Path]

# Single-channel modes whose pixel values are class indices. 'P' (palette, as VOC masks) keeps
# the palette indices, not the colours.
INDEX_MASK_MODES = ("1", "L", "P", "I", "I;16", "I;16L", "I;16B", "I;16N")


def _unreadable(path: Path, what: str, error: BaseException) -> DataError:
    """What is wrong with an image file PIL could not decode, in plain words."""
    reason = " ".join((str(error).splitlines() or [""])[0].split()) or type(error).__name__
    try:
        head = file_kind.read_head(path)
    except OSError:
        head = b"?"
    if not head:
        return DataError(f"{what} {path} is empty (0 bytes)")
    if isinstance(error, UnidentifiedImageError):
        kind = file_kind.describe(head)
        if kind is not None and kind.endswith(" image"):
            return DataError(f"{what} {path} is truncated or corrupt ({kind} whose header "
                             "cannot be read)")
        return DataError(f"{what} {path} is not an image" + (f" ({kind})" if kind else
                                                              " (unrecognised content)"))
    if isinstance(error, EOFError) or "truncated" in reason.lower():
        detail = "" if "truncated" in reason.lower() else f" ({reason})"
        return DataError(f"{what} {path} is truncated{detail}")
    if isinstance(error, Image.DecompressionBombError):
        return DataError(f"{what} {path} is too large to decode ({reason})")
    return DataError(f"{what} {path} is corrupt ({reason[:200]})")


def open_decoded(path: PathLike, what: str = "image") -> Image.Image:
    """Open ``path`` and decode every pixel; ``what`` names the file's role in errors.

    Whatever PIL raises on a damaged file (OSError, SyntaxError, struct.error, …) becomes one
    :class:`DataError` saying what is wrong: empty, truncated, not an image, corrupt.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} {path} not found")
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except MemoryError:
        raise DataError(f"{what} {path} is corrupt (it asks for more memory than there is)") from None
    except Exception as error:  # noqa: BLE001 - a damaged file makes PIL raise nearly anything
        if isinstance(error, OSError) and error.errno is not None:
            raise DataError(f"cannot read {what} {path}: {error.strerror or error}") from None
        raise _unreadable(path, what, error) from None


def load_image(path: PathLike) -> Image.Image:
    """Load an image as 8-bit RGB (palette, grey and RGBA images are converted)."""
    image = open_decoded(path, "image")
    if image.mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as error:  # a mode PIL cannot convert (e.g. some 16-bit ones)
        raise DataError(f"image {path} has mode {image.mode}, which cannot be read as RGB "
                        f"({error})") from None


def mask_dtype(num_classes: int, ignore_index: int) -> np.dtype:
    """``uint8`` when every allowed value fits in it (the usual case), else ``int64``."""
    fits = num_classes <= 256 and 0 <= ignore_index <= 255
    return np.dtype(np.uint8) if fits else np.dtype(np.int64)


def load_mask(path: PathLike, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """Load an index mask as an ``H×W`` array, values in ``[0, num_classes) ∪ {ignore_index}``.

    Accepts single-channel masks ('L', 'P' palette, 'I', 'I;16'); colour (RGB/RGBA) masks are
    refused, since their colours are not class indices. The array is ``uint8`` when the allowed
    values fit (see :func:`mask_dtype`), else ``int64``.
    """
    image = open_decoded(path, "mask")
    if image.mode not in INDEX_MASK_MODES:
        raise DataError(
            f"mask {path} has mode {image.mode} ({len(image.getbands())} channels); expected a "
            "single-channel index mask (L, P or I) whose values are class indices"
        )
    values = np.asarray(image)
    invalid = ((values < 0) | (values >= num_classes)) & (values != ignore_index)
    if invalid.any():
        bad = np.unique(values[invalid])
        others = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise DataError(
            f"mask {path} has value {int(bad[0])} outside [0, {num_classes}) "
            f"and != ignore {ignore_index}{others}"
        )
    return values.astype(mask_dtype(num_classes, ignore_index), copy=False)


def check_same_size(
    image: Image.Image, mask: np.ndarray, image_path: PathLike, mask_path: PathLike
) -> None:
    """Raise :class:`DataError` when a mask's size differs from its image's (sizes as W×H)."""
    mask_height, mask_width = mask.shape[:2]
    image_width, image_height = image.size
    if (mask_width, mask_height) != (image_width, image_height):
        raise DataError(
            f"mask size {mask_width}x{mask_height} != image size {image_width}x{image_height} "
            f"(width x height) for {image_path} and {mask_path}"
        )

