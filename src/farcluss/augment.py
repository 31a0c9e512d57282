"""Batched strong augmentation on the training device: colour jitter, grayscale, blur, CutMix.

The strong view of FARCLUSS (docs/method.md §0) is the weak view plus photometric noise and CutMix.
It runs on whole batches where the model runs, instead of in the data workers, so the teacher's
weak view and the student's strong view come from the same crop without a second decode.

Every random number comes from a ``torch.Generator`` passed by the caller and the number of
draws per call depends only on the batch size, never on which operations fire: a run that
resumes with the generator's saved state replays exactly the same augmentations. Training
draws instead from :func:`per_sample_uniform`, one stream per image seeded by the sampler, so an
image's strong view depends on its place in the data stream only — not on the rank that holds
it or the images that share its batch (DDP with W × b images equals one process with W·b).

Colour operations follow torchvision's ``ColorJitter`` semantics on images in [0, 1]; hue is
rotated in HSV space (not YIQ), as torchvision does. Each image draws its own factors, its own
order of the four jitter operations and its own coin flips.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from farcluss.errors import ConfigError

# ITU-R 601 luma, the weights torchvision and PIL use for RGB -> L.
_LUMA_WEIGHTS = (0.299, 0.587, 0.114)

# Indices of the jitter operations in StrongAugmentParams.order.
_BRIGHTNESS, _CONTRAST, _SATURATION, _HUE = range(4)

#: U[0, 1) numbers one image consumes: strong-view parameters and its CutMix box.
STRONG_AUGMENT_DRAWS = 12
CUTMIX_DRAWS = 5


def _per_sample(factor: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Shape a (B,) factor as B×1×1×1 on the images' device and dtype."""
    return factor.to(device=images.device, dtype=images.dtype).view(-1, 1, 1, 1)


def rgb_to_grayscale(images: torch.Tensor) -> torch.Tensor:
    """Luma of B×3×H×W RGB images: L = 0.299 R + 0.587 G + 0.114 B, shape B×1×H×W."""
    weights = images.new_tensor(_LUMA_WEIGHTS).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True)


def adjust_brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """x' = clamp(b·x, 0, 1) with one factor b per image."""
    return (images * _per_sample(factor, images)).clamp(0.0, 1.0)


def adjust_contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """x' = clamp(c·x + (1 − c)·m, 0, 1), m = mean luma of the image, one c per image."""
    mean_luma = rgb_to_grayscale(images).mean(dim=(1, 2, 3), keepdim=True)
    factor = _per_sample(factor, images)
    return (factor * images + (1.0 - factor) * mean_luma).clamp(0.0, 1.0)


def adjust_saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """x' = clamp(s·x + (1 − s)·L(x), 0, 1), L = per-pixel luma, one s per image."""
    factor = _per_sample(factor, images)
    return (factor * images + (1.0 - factor) * rgb_to_grayscale(images)).clamp(0.0, 1.0)


def rgb_to_hsv(images: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1] → HSV with hue in [0, 1) (fraction of a turn), B×3×H×W.

    V = max(R,G,B), S = (V − min)/V, H = sector offset + (difference of the other two)/(V − min),
    over 6; grey pixels (V = min) get H = 0 and black pixels S = 0.
    """
    red, green, blue = images.unbind(dim=1)
    value, argmax = images.max(dim=1)
    chroma = value - images.min(dim=1).values
    # Dividing by a clamped chroma keeps grey pixels finite; their hue is masked to 0 below.
    safe_chroma = chroma.clamp_min(torch.finfo(images.dtype).eps)
    hue_red = torch.remainder((green - blue) / safe_chroma, 6.0)
    hue_green = (blue - red) / safe_chroma + 2.0
    hue_blue = (red - green) / safe_chroma + 4.0
    hue = torch.where(argmax == 0, hue_red, torch.where(argmax == 1, hue_green, hue_blue))
    hue = torch.where(chroma > 0, hue / 6.0, torch.zeros_like(hue))
    saturation = torch.where(value > 0, chroma / value.clamp_min(torch.finfo(images.dtype).eps),
                             torch.zeros_like(value))
    return torch.stack((hue, saturation, value), dim=1)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """HSV (hue in [0, 1)) → RGB, B×3×H×W.

    Branch-free form: channel_n = V − V·S·clamp(min(k, 4 − k), 0, 1), k = (n + 6H) mod 6,
    with n = 5, 3, 1 for R, G, B.
    """
    hue, saturation, value = hsv.unbind(dim=1)
    offsets = hsv.new_tensor((5.0, 3.0, 1.0)).view(1, 3, 1, 1)
    k = torch.remainder(offsets + 6.0 * hue.unsqueeze(1), 6.0)
    ramp = torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)
    return value.unsqueeze(1) * (1.0 - saturation.unsqueeze(1) * ramp)


def adjust_hue(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue: H' = (H + h) mod 1, one h ∈ [−0.5, 0.5] per image."""
    hsv = rgb_to_hsv(images)
    shift = factor.to(device=images.device, dtype=images.dtype).view(-1, 1, 1)
    hue = torch.remainder(hsv[:, 0] + shift, 1.0)
    return hsv_to_rgb(torch.stack((hue, hsv[:, 1], hsv[:, 2]), dim=1))


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur with one σ per image, B×C×H×W.

    g_σ(t) = exp(−t² / 2σ²) / Σ_t' exp(−t'² / 2σ²) for t ∈ [−r, r], r = kernel_size // 2; the
    image is convolved with g along rows, then along columns, as one grouped convolution over
    the B·C channels. Borders are reflected (replicated when the image is smaller than r + 1).
    """
    batch, channels, height, width = images.shape
    radius = kernel_size // 2
    taps = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    sigma = sigma.to(device=images.device, dtype=images.dtype).view(-1, 1)
    kernel = torch.softmax(-(taps**2) / (2.0 * sigma**2), dim=1)  # normalised exp(−t²/2σ²)
    kernel = kernel.repeat_interleave(channels, dim=0)  # one kernel per (image, channel)
    groups = batch * channels
    pad_mode = "reflect" if radius < min(height, width) else "replicate"
    flat = images.reshape(1, groups, height, width)
    flat = F.pad(flat, (radius, radius, 0, 0), mode=pad_mode)
    flat = F.conv2d(flat, kernel.view(groups, 1, 1, -1), groups=groups)
    flat = F.pad(flat, (0, 0, radius, radius), mode=pad_mode)
    flat = F.conv2d(flat, kernel.view(groups, 1, -1, 1), groups=groups)
    return flat.view(batch, channels, height, width)


@dataclass
class StrongAugmentParams:
    """Per-image random parameters of one StrongAugment call (every field has batch size B)."""

    jitter: torch.Tensor  # bool (B,): colour jitter applied
    brightness: torch.Tensor  # (B,) multiplicative factor
    contrast: torch.Tensor  # (B,) blend factor with the mean luma
    saturation: torch.Tensor  # (B,) blend factor with the per-pixel luma
    hue: torch.Tensor  # (B,) hue shift in turns
    order: torch.Tensor  # int64 (B, 4): jitter operation applied at each position
    grayscale: torch.Tensor  # bool (B,)
    blur: torch.Tensor  # bool (B,)
    blur_sigma: torch.Tensor  # (B,)

    def to(self, device: torch.device) -> "StrongAugmentParams":
        return StrongAugmentParams(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


class StrongAugment:
    """Photometric strong view of normalised images: colour jitter → grayscale → Gaussian blur.

    Args:
        brightness, contrast, saturation: factor ranges [max(0, 1 − v), 1 + v] (torchvision).
        hue: shift range [−hue, hue] in turns of the colour wheel, hue ≤ 0.5.
        jitter_prob, grayscale_prob, blur_prob: per-image probabilities of each stage.
        blur_sigma: (σ_min, σ_max) of the per-image Gaussian.
        blur_kernel: odd kernel size; default 2·⌈3·σ_max⌉ + 1, so the widest Gaussian is cut at
            3σ and the kernel is independent of the image size.
        mean, std: per-channel normalisation of the input images (``data.mean``/``data.std``).

    Images are denormalised to [0, 1] (clamped), augmented in float32 and renormalised; an image
    that no stage touches is returned bit-for-bit.
    """

    def __init__(
        self,
        brightness: float = 0.5,
        contrast: float = 0.5,
        saturation: float = 0.5,
        hue: float = 0.25,
        jitter_prob: float = 0.8,
        grayscale_prob: float = 0.2,
        blur_prob: float = 0.5,
        blur_sigma: Tuple[float, float] = (0.1, 2.0),
        blur_kernel: Optional[int] = None,
        *,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        # the ranges are config's (farcluss.config, augment.*): checked once, at load
        sigma_min, sigma_max = (float(s) for s in blur_sigma)
        if blur_kernel is None:
            blur_kernel = 2 * math.ceil(3.0 * sigma_max) + 1
        if blur_kernel < 1 or blur_kernel % 2 == 0:
            raise ConfigError(f"strong augmentation: blur_kernel must be a positive odd integer, got {blur_kernel}")

        self.brightness = float(brightness)
        self.contrast = float(contrast)
        self.saturation = float(saturation)
        self.hue = float(hue)
        self.jitter_prob = float(jitter_prob)
        self.grayscale_prob = float(grayscale_prob)
        self.blur_prob = float(blur_prob)
        self.blur_sigma = (sigma_min, sigma_max)
        self.blur_kernel = int(blur_kernel)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def sample_params(self, batch_size: int, generator: torch.Generator) -> StrongAugmentParams:
        """Draw the parameters of every image from ``generator`` (on its own device).

        Always draws one B×12 uniform block, whatever the probabilities, so the generator's state
        after the call depends only on the batch size.
        """
        uniform = torch.rand(batch_size, STRONG_AUGMENT_DRAWS, generator=generator,
                             device=generator.device)
        return self.params_from_uniform(uniform)

    def params_from_uniform(self, uniform: torch.Tensor) -> StrongAugmentParams:
        """The parameters of every image from a B×12 block of U[0, 1) numbers (one row per image)."""
        if uniform.dim() != 2 or uniform.shape[1] != STRONG_AUGMENT_DRAWS:
            raise ValueError(f"expected B×{STRONG_AUGMENT_DRAWS} uniforms, got shape {tuple(uniform.shape)}")
        uniform = uniform.float()

        def factor_range(column: int, strength: float) -> torch.Tensor:
            low, high = max(0.0, 1.0 - strength), 1.0 + strength
            return low + (high - low) * uniform[:, column]

        sigma_min, sigma_max = self.blur_sigma
        return StrongAugmentParams(
            jitter=uniform[:, 0] < self.jitter_prob,
            brightness=factor_range(1, self.brightness),
            contrast=factor_range(2, self.contrast),
            saturation=factor_range(3, self.saturation),
            hue=self.hue * (2.0 * uniform[:, 4] - 1.0),
            # argsort of i.i.d. uniforms is a uniformly random permutation per image.
            order=uniform[:, 5:9].argsort(dim=1),
            grayscale=uniform[:, 9] < self.grayscale_prob,
            blur=uniform[:, 10] < self.blur_prob,
            blur_sigma=sigma_min + (sigma_max - sigma_min) * uniform[:, 11],
        )

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Strong views of normalised B×3×H×W images, same shape, device and dtype."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected B×3×H×W images, got shape {tuple(images.shape)}")
        params = self.sample_params(images.shape[0], generator).to(images.device)
        return self.apply(images, params)

    def apply(self, images: torch.Tensor, params: StrongAugmentParams) -> torch.Tensor:
        """Augment normalised images with given parameters (already on the images' device)."""
        # Data preparation, not model compute: under train.amp the blur convolution would
        # otherwise run in bf16/fp16 and quantise the strong view.
        with torch.autocast(device_type=images.device.type, enabled=False):
            return self._apply_fp32(images, params)

    def _apply_fp32(self, images: torch.Tensor, params: StrongAugmentParams) -> torch.Tensor:
        mean = torch.tensor(self.mean, device=images.device, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=images.device, dtype=torch.float32).view(1, 3, 1, 1)
        pixels = (images.float() * std + mean).clamp(0.0, 1.0)

        strengths = {_BRIGHTNESS: self.brightness, _CONTRAST: self.contrast,
                     _SATURATION: self.saturation, _HUE: self.hue}
        operations = {
            _BRIGHTNESS: (adjust_brightness, params.brightness),
            _CONTRAST: (adjust_contrast, params.contrast),
            _SATURATION: (adjust_saturation, params.saturation),
            _HUE: (adjust_hue, params.hue),
        }
        # Each image has its own order: at each position, every operation runs on the subset of
        # images that scheduled it there. Zero-strength operations are identities and are skipped.
        for position in range(4):
            for op_index, (operation, factors) in operations.items():
                if strengths[op_index] == 0.0:
                    continue
                selected = torch.nonzero(params.jitter & (params.order[:, position] == op_index)).squeeze(1)
                if selected.numel():
                    pixels[selected] = operation(pixels[selected], factors[selected])

        gray_selected = torch.nonzero(params.grayscale).squeeze(1)
        if gray_selected.numel():
            pixels[gray_selected] = rgb_to_grayscale(pixels[gray_selected]).expand(-1, 3, -1, -1)

        blur_selected = torch.nonzero(params.blur).squeeze(1)
        if blur_selected.numel():
            pixels[blur_selected] = gaussian_blur(pixels[blur_selected], params.blur_sigma[blur_selected],
                                                  self.blur_kernel)

        augmented = ((pixels - mean) / std).to(images.dtype)
        jitter_active = any(strength != 0.0 for strength in strengths.values())
        touched = (params.jitter & jitter_active) | params.grayscale | params.blur
        return torch.where(touched.view(-1, 1, 1, 1), augmented, images)


# ---------------------------------------------------------------------------------------------
# CutMix
# ---------------------------------------------------------------------------------------------


def cutmix_masks(
    batch_size: int,
    height: int,
    width: int,
    prob: float = 0.5,
    area: Tuple[float, float] = (0.02, 0.4),
    aspect: Tuple[float, float] = (0.3, 1 / 0.3),
    *,
    generator: torch.Generator,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """One random box per image as a bool B×H×W mask (all False with probability 1 − prob).

    Area fraction a ~ U(area), aspect r = h/w log-uniform in ``aspect`` (so r and 1/r are
    equally likely); h = round(√(a·H·W·r)), w = round(√(a·H·W/r)), each clamped to [1, side].
    The box lies entirely inside the image, at a uniform position. Clamping a side only shrinks
    the box, so its area never exceeds ``area[1]``; rounding moves it by at most one row/column.
    Draws a fixed B×5 block from ``generator``.
    """
    uniform = torch.rand(batch_size, CUTMIX_DRAWS, generator=generator, device=generator.device,
                         dtype=torch.float64)
    return cutmix_masks_from_uniform(uniform, height, width, prob, area, aspect, device=device)


def cutmix_masks_from_uniform(
    uniform: torch.Tensor,
    height: int,
    width: int,
    prob: float = 0.5,
    area: Tuple[float, float] = (0.02, 0.4),
    aspect: Tuple[float, float] = (0.3, 1 / 0.3),
    *,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """`cutmix_masks` from a given B×5 block of U[0, 1) numbers (one row per image)."""
    # prob, area and aspect ranges are config's (augment.cutmix_*), checked at load
    if uniform.dim() != 2 or uniform.shape[1] != CUTMIX_DRAWS:
        raise ValueError(f"expected B×{CUTMIX_DRAWS} uniforms, got shape {tuple(uniform.shape)}")
    device = torch.device("cpu") if device is None else torch.device(device)
    uniform = uniform.to(device=device, dtype=torch.float64)

    apply = uniform[:, 0] < prob
    box_area = (area[0] + (area[1] - area[0]) * uniform[:, 1]) * height * width
    log_aspect = math.log(aspect[0]) + (math.log(aspect[1]) - math.log(aspect[0])) * uniform[:, 2]
    ratio = torch.exp(log_aspect)
    box_height = torch.sqrt(box_area * ratio).round().clamp(1, height).long()
    box_width = torch.sqrt(box_area / ratio).round().clamp(1, width).long()
    # floor(u·(n + 1)) is uniform on {0, …, n}; the min guards u·(n + 1) rounding up to n + 1.
    top = torch.minimum((uniform[:, 3] * (height - box_height + 1)).long(), height - box_height)
    left = torch.minimum((uniform[:, 4] * (width - box_width + 1)).long(), width - box_width)

    rows = torch.arange(height, device=device).view(1, -1, 1)
    cols = torch.arange(width, device=device).view(1, 1, -1)
    inside_rows = (rows >= top.view(-1, 1, 1)) & (rows < (top + box_height).view(-1, 1, 1))
    inside_cols = (cols >= left.view(-1, 1, 1)) & (cols < (left + box_width).view(-1, 1, 1))
    return inside_rows & inside_cols & apply.view(-1, 1, 1)


def cutmix_partners(
    batch_size: int, generator: torch.Generator, device: Optional[torch.device] = None
) -> torch.Tensor:
    """Index of the image each image takes its box from, never itself when B > 1.

    A random cyclic order of the batch: image π_j takes its box from π_{j+1 mod B}. Every image
    is the source of exactly one box. With B = 1 there is no other image: the result is [0] and
    ``apply_cutmix`` leaves the batch unchanged. Draws a fixed B-long permutation.
    """
    cycle = torch.randperm(batch_size, generator=generator, device=generator.device)
    device = torch.device("cpu") if device is None else torch.device(device)
    return _partners_of_cycle(cycle).to(device)


def cutmix_partners_from_keys(keys: torch.Tensor) -> torch.Tensor:
    """`cutmix_partners` whose cyclic order sorts one U[0, 1) key per image.

    Keys drawn from each image's own stream make the pairing a function of which images share
    the batch, whatever their order in it; i.i.d. keys give a uniformly random cycle.
    """
    return _partners_of_cycle(keys.reshape(-1).argsort())


def _partners_of_cycle(cycle: torch.Tensor) -> torch.Tensor:
    partner = torch.empty_like(cycle)
    partner[cycle] = cycle.roll(-1)
    return partner


def per_sample_uniform(seeds: Union[torch.Tensor, Sequence[int]], columns: int) -> torch.Tensor:
    """B×columns float64 U[0, 1) numbers on the CPU; row i comes from a generator seeded with seeds[i].

    The sampler gives every item a 63-bit seed tied to its position in the (global) data stream,
    so a row depends on that position alone: not on the rank, the batch size or the neighbours in
    the batch, and a resumed run redraws it without saved generator state. The loop runs over
    images (a few per batch), never over pixels.
    """
    if isinstance(seeds, torch.Tensor):
        seeds = seeds.reshape(-1).tolist()
    rows = [torch.rand(columns, generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float64)
            for seed in seeds]
    if not rows:
        return torch.empty(0, columns, dtype=torch.float64)
    return torch.stack(rows)


def apply_cutmix(tensor: torch.Tensor, box_mask: torch.Tensor, partner_index: torch.Tensor) -> torch.Tensor:
    """Replace the pixels inside each box with those of the partner image.

    out[i, ..., y, x] = tensor[partner_index[i], ..., y, x] where box_mask[i, y, x], else tensor[i].
    Works for images/probabilities B×C×H×W and masks/weights B×H×W; using the same box_mask and
    partner_index for every tensor of a batch keeps images, targets and weights aligned.
    """
    if tensor.dim() not in (3, 4) or box_mask.shape != (tensor.shape[0], *tensor.shape[-2:]):
        raise ValueError(f"cutmix: box mask {tuple(box_mask.shape)} does not match tensor {tuple(tensor.shape)}")
    mask = box_mask if tensor.dim() == 3 else box_mask.unsqueeze(1)
    return torch.where(mask, tensor[partner_index], tensor)
