"""Weak augmentation (rescale, pad, crop, flip, normalise) and the evaluation transform.

All randomness comes from the ``np.random.Generator`` passed in, seeded by the sampler with the
sample's position in the stream, so a resumed run replays the same crops. The strong
(photometric) augmentation runs batched on the training device (:mod:`farcluss.augment`) on top
of these weak views, through :func:`denormalize` / :func:`normalize`.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _channel_stats(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """Per-channel statistics shaped to broadcast over ``3×H×W`` or ``B×3×H×W``."""
    return torch.as_tensor(values, dtype=like.dtype, device=like.device).view(-1, 1, 1)


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(x − mean) / std`` per channel, for images in ``[0, 1]``."""
    return (images - _channel_stats(mean, images)) / _channel_stats(std, images)


def denormalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Inverse of :func:`normalize`: ``x · std + mean``, back to the ``[0, 1]`` range."""
    return images * _channel_stats(std, images) + _channel_stats(mean, images)


def image_to_tensor(
    image: Union[Image.Image, np.ndarray], mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """An ``H×W×3`` uint8 image → normalised ``3×H×W`` float32 tensor."""
    pixels = torch.from_numpy(np.array(image, dtype=np.float32, copy=True)).div_(255.0)
    return normalize(pixels.permute(2, 0, 1).contiguous(), mean, std)


def _pair(size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    """A crop size as ``(height, width)``."""
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


class WeakAugment:
    """Random rescale, rotation, pad, random crop and horizontal flip of an image and its mask.

    The image is rescaled by a factor drawn uniformly from ``scale_range`` (aspect kept;
    bilinear), the mask with nearest-neighbour only so no new class values appear. With
    ``rotate_degrees`` = d > 0 both are then rotated about their centre by an angle drawn
    uniformly from [−d, d] (same canvas size; image bilinear, mask nearest); the corners the
    rotation brings in count as padding. With d = 0 no angle is drawn, so the random stream —
    and every crop — is the same as before rotation existed. Where the
    rescaled image is smaller than the crop it is padded on the bottom/right: the image with
    the mean colour (0 after normalisation), the mask with ``ignore_index``. The returned
    ``ignore_mask`` is ``ignore_index`` on padded pixels and 0 elsewhere, so unlabeled losses
    skip the padding.
    """

    def __init__(
        self,
        crop_size: Union[int, Sequence[int]],
        scale_range: Tuple[float, float] = (0.5, 2.0),
        flip_prob: float = 0.5,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        ignore_index: int = 255,
        rotate_degrees: float = 0.0,
    ):
        self.crop_height, self.crop_width = _pair(crop_size)
        # the ranges are config's (data.crop_size, data.scale_range, data.flip_prob)
        low, high = scale_range
        self.scale_range = (float(low), float(high))
        self.flip_prob = float(flip_prob)
        self.rotate_degrees = float(rotate_degrees)
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.ignore_index = ignore_index

    def __call__(
        self, image: Image.Image, mask: Optional[np.ndarray], rng: np.random.Generator
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
        """Return ``(image 3×h×w float32, mask h×w int64 or None, ignore_mask h×w int64)``."""
        scale = rng.uniform(*self.scale_range)
        width, height = image.size
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = image.resize(size, Image.BILINEAR)
        if mask is not None:
            mask = _resize_nearest(mask, size)
        width, height = size
        # 1 where the canvas holds image content, 0 where a rotation brought in a corner
        content = None
        if self.rotate_degrees > 0:
            angle = rng.uniform(-self.rotate_degrees, self.rotate_degrees)
            image, mask, content = _rotate(image, mask, angle, self.ignore_index)

        # Crop window on the canvas padded at the bottom/right up to the crop size.
        top = int(rng.integers(0, max(height - self.crop_height, 0) + 1))
        left = int(rng.integers(0, max(width - self.crop_width, 0) + 1))
        bottom = min(top + self.crop_height, height)
        right = min(left + self.crop_width, width)
        valid = (slice(0, bottom - top), slice(0, right - left))

        crop_shape = (self.crop_height, self.crop_width)
        image_crop = torch.zeros(3, *crop_shape)
        pixels = np.asarray(image)[top:bottom, left:right]
        image_crop[(slice(None),) + valid] = image_to_tensor(pixels, self.mean, self.std)
        ignore_mask = torch.full(crop_shape, self.ignore_index, dtype=torch.int64)
        ignore_mask[valid] = 0
        if content is not None:
            outside = torch.zeros(crop_shape, dtype=torch.bool)
            outside[valid] = torch.from_numpy(content[top:bottom, left:right] == 0)
            ignore_mask[outside] = self.ignore_index
            # the mean colour, exactly as the bottom/right padding
            image_crop[:, outside] = 0.0
        mask_crop = None
        if mask is not None:
            mask_crop = torch.full(crop_shape, self.ignore_index, dtype=torch.int64)
            mask_crop[valid] = torch.from_numpy(mask[top:bottom, left:right].astype(np.int64))

        if rng.random() < self.flip_prob:
            image_crop = image_crop.flip(-1)
            ignore_mask = ignore_mask.flip(-1)
            mask_crop = None if mask_crop is None else mask_crop.flip(-1)
        return image_crop, mask_crop, ignore_mask


def _rotate(image: Image.Image, mask: Optional[np.ndarray], angle: float, ignore_index: int
            ) -> Tuple[Image.Image, Optional[np.ndarray], np.ndarray]:
    """Rotate an image (bilinear) and its mask (nearest) by ``angle`` degrees anticlockwise.

    Returns the rotated image, the rotated mask (``ignore_index`` in the corners brought in)
    and an ``H×W`` uint8 array that is 1 on image content and 0 on those corners.
    """
    content = Image.new("L", image.size, 1).rotate(angle, Image.NEAREST, fillcolor=0)
    image = image.rotate(angle, Image.BILINEAR)
    if mask is not None:
        mode_mask = Image.fromarray(mask if mask.dtype == np.uint8 else mask.astype(np.int32))
        rotated = mode_mask.rotate(angle, Image.NEAREST, fillcolor=ignore_index)
        mask = np.asarray(rotated).astype(mask.dtype)
    return image, mask, np.asarray(content)


def _resize_nearest(mask: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an ``H×W`` index mask to ``size = (width, height)``."""
    if mask.shape[::-1] == tuple(size):
        return mask
    if mask.dtype == np.uint8:
        return np.asarray(Image.fromarray(mask).resize(size, Image.NEAREST))
    # PIL's 32-bit integer mode carries index values beyond 255.
    resized = Image.fromarray(mask.astype(np.int32)).resize(size, Image.NEAREST)
    return np.asarray(resized).astype(mask.dtype)


class EvalTransform:
    """The full image normalised and its mask as int64, no randomness.

    Center cropping and sliding windows belong to the evaluator, which sees whole images.
    """

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.mean = tuple(mean)
        self.std = tuple(std)

    def __call__(
        self, image: Image.Image, mask: Optional[np.ndarray]
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Return ``(image 3×H×W float32, mask H×W int64 or None)``."""
        image_tensor = image_to_tensor(image, self.mean, self.std)
        mask_tensor = None if mask is None else torch.from_numpy(mask.astype(np.int64))
        return image_tensor, mask_tensor
