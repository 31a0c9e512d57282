"""Evaluation: whole-image, centre-crop and sliding-window inference, confusion matrix, mIoU.

Every inference mode returns softmax probabilities together with the region of the input they
cover, so the evaluator compares exactly the pixels that were predicted:

    probs, (rows, cols) = predict(model, images, mode, ...)
    confusion += confusion_matrix(probs.argmax(1), masks[:, rows, cols], num_classes)

The model contract (docs/architecture.md): ``model(images)[0]`` are logits at the input size.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from farcluss.errors import ConfigError, DataError
from farcluss.log import Progress

Region = Tuple[slice, slice]
EVAL_MODES = ("whole", "center_crop", "sliding")
_FULL_REGION: Region = (slice(None), slice(None))


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255
) -> torch.Tensor:
    """C×C int64 counts on the inputs' device: entry [g, p] = #pixels with ground truth g, prediction p.

    Pixels whose target is ``ignore_index`` are left out. A target outside [0, C) that is not
    ``ignore_index`` is a dataset error (a label map that does not match the class list).
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    target = target.long()
    pred = pred.long()
    valid = target != ignore_index
    out_of_range = valid & ((target < 0) | (target >= num_classes))
    if out_of_range.any():
        label = int(target[out_of_range][0])
        raise DataError(
            f"mask holds label {label}, outside 0..{num_classes - 1} and not ignore_index {ignore_index}"
        )
    # g·C + p indexes the flattened C×C matrix; bincount counts on the device, no host copy.
    flat_index = target[valid] * num_classes + pred[valid]
    counts = torch.bincount(flat_index, minlength=num_classes * num_classes)
    return counts.view(num_classes, num_classes)


def segmentation_metrics(
    confusion: torch.Tensor, class_names: Optional[Sequence[str]] = None
) -> Dict[str, object]:
    """mIoU and pixel accuracy (percent) from a C×C confusion matrix (rows = ground truth).

        IoU_c = TP_c / (TP_c + FP_c + FN_c)  = M[c,c] / (Σ_p M[c,p] + Σ_g M[g,c] − M[c,c])
        mIoU  = mean of IoU_c over classes with TP_c + FP_c + FN_c > 0
        pixel accuracy = Σ_c M[c,c] / Σ M

    A class absent from both ground truth and predictions has no IoU: it is reported as None
    and left out of the mean. With no valid pixel at all, miou and pixel_accuracy are None.

    Where a class's pixels go when they are wrong (``confused_with``, per class): the other class
    that takes the largest share of its ground-truth pixels,

        j*(c) = argmax_{j≠c} M[c,j],   share = 100 · M[c,j*] / Σ_j M[c,j],

    as ``[name of j*, share]``, or None when the class has no ground-truth pixel or none is
    wrong. A rare class absorbed by a frequent look-alike shows here before it shows in the mIoU.

    Returns {"miou", "per_class_iou", "pixel_accuracy", "class_names", "confused_with"} as plain
    Python values.
    """
    if confusion.dim() != 2 or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(f"confusion matrix must be C×C, got shape {tuple(confusion.shape)}")
    num_classes = confusion.shape[0]
    if class_names is None:
        class_names = [str(index) for index in range(num_classes)]
    elif len(class_names) != num_classes:
        raise ConfigError(f"class_names has {len(class_names)} names for {num_classes} classes")

    counts = confusion.detach().to(device="cpu", dtype=torch.float64)
    true_positive = counts.diagonal()
    union = counts.sum(dim=1) + counts.sum(dim=0) - true_positive
    present = union > 0
    iou = torch.where(present, true_positive / union.clamp_min(1.0), torch.full_like(union, math.nan)) * 100.0
    total = counts.sum()

    off_diagonal = counts - torch.diag(true_positive)
    confused_with: List[Optional[List[object]]] = []
    for row, ground_truth in zip(off_diagonal, counts.sum(dim=1)):
        wrong, other = row.max(dim=0)
        confused_with.append([class_names[int(other)], float(wrong / ground_truth * 100.0)]
                             if wrong > 0 else None)
    return {
        "miou": float(iou[present].mean()) if bool(present.any()) else None,
        "per_class_iou": [float(value) if not math.isnan(value) else None for value in iou.tolist()],
        "pixel_accuracy": float(true_positive.sum() / total * 100.0) if total > 0 else None,
        "class_names": list(class_names),
        "confused_with": confused_with,
    }


# ---------------------------------------------------------------------------------------------
# Inference
# ---------------------------------------------------------------------------------------------


def _pair(size: Union[int, Sequence[int]], name: str) -> Tuple[int, int]:
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    if height < 1 or width < 1:
        raise ConfigError(f"{name} must be positive, got {size}")
    return int(height), int(width)


def _model_probs(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    return torch.softmax(model(images)[0].float(), dim=1)


def predict_whole(model: torch.nn.Module, images: torch.Tensor, output_stride: Optional[int] = 16) -> torch.Tensor:
    """Probabilities B×C×H×W of the whole image in one forward pass.

    The image is zero-padded on the right and bottom to a multiple of ``output_stride`` (zero is
    the mean colour after normalisation), so every feature cell covers whole input pixels; the
    output is cropped back to H×W. ``output_stride`` None or 1 disables padding.
    """
    height, width = images.shape[-2:]
    stride = output_stride or 1
    pad_bottom = -height % stride
    pad_right = -width % stride
    padded = F.pad(images, (0, pad_right, 0, pad_bottom)) if pad_bottom or pad_right else images
    return _model_probs(model, padded)[..., :height, :width]


def center_crop_region(height: int, width: int, crop_size: Union[int, Sequence[int]]) -> Region:
    """(rows, cols) slices of the centred crop_size window, shrunk to the image where it is smaller."""
    crop_height, crop_width = _pair(crop_size, "crop_size")
    crop_height, crop_width = min(crop_height, height), min(crop_width, width)
    top = (height - crop_height) // 2
    left = (width - crop_width) // 2
    return slice(top, top + crop_height), slice(left, left + crop_width)


def predict_center_crop(
    model: torch.nn.Module,
    images: torch.Tensor,
    crop_size: Union[int, Sequence[int]],
    output_stride: Optional[int] = 16,
) -> Tuple[torch.Tensor, Region]:
    """Probabilities of the centred crop only, and the (rows, cols) region of the input it covers.

    Compare with ``masks[:, rows, cols]``: pixels outside the crop are not evaluated.
    """
    rows, cols = center_crop_region(images.shape[-2], images.shape[-1], crop_size)
    return predict_whole(model, images[..., rows, cols], output_stride), (rows, cols)


def _window_starts(length: int, window: int, stride: int) -> List[int]:
    """Starts of full windows covering [0, length): every ``stride``, the last one ending at the border."""
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] + window < length:
        starts.append(length - window)
    return starts


def sliding_window_counts(
    height: int, width: int, window: Union[int, Sequence[int]], stride_ratio: float = 2 / 3,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """H×W number of sliding windows covering each pixel (image padded to the window if smaller)."""
    window_height, window_width = _pair(window, "window")
    padded_height, padded_width = max(height, window_height), max(width, window_width)
    counts = torch.zeros(padded_height, padded_width, device=device)
    for top, left in _window_grid(padded_height, padded_width, window_height, window_width, stride_ratio):
        counts[top:top + window_height, left:left + window_width] += 1
    return counts[:height, :width]


def _window_grid(height: int, width: int, window_height: int, window_width: int,
                 stride_ratio: float) -> List[Tuple[int, int]]:
    if not 0.0 < stride_ratio <= 1.0:
        raise ConfigError(f"sliding window stride_ratio must be in (0, 1], got {stride_ratio}")
    stride_height = max(1, int(window_height * stride_ratio))
    stride_width = max(1, int(window_width * stride_ratio))
    return [(top, left)
            for top in _window_starts(height, window_height, stride_height)
            for left in _window_starts(width, window_width, stride_width)]


def predict_sliding(
    model: torch.nn.Module,
    images: torch.Tensor,
    window: Union[int, Sequence[int]],
    stride_ratio: float = 2 / 3,
) -> torch.Tensor:
    """Probabilities B×C×H×W averaged over overlapping windows.

        P(x) = Σ_{w ∋ x} softmax(f(window w))(x) / #{w ∋ x}

    Windows have size ``window`` and stride int(window · stride_ratio); the last window in each
    direction is moved back to end at the image border, so every window is full. An image
    smaller than the window is zero-padded to it and the output cropped back.
    """
    window_height, window_width = _pair(window, "window")
    height, width = images.shape[-2:]
    pad_bottom, pad_right = max(0, window_height - height), max(0, window_width - width)
    padded = F.pad(images, (0, pad_right, 0, pad_bottom)) if pad_bottom or pad_right else images
    padded_height, padded_width = padded.shape[-2:]

    prob_sum: Optional[torch.Tensor] = None
    for top, left in _window_grid(padded_height, padded_width, window_height, window_width, stride_ratio):
        rows, cols = slice(top, top + window_height), slice(left, left + window_width)
        window_probs = _model_probs(model, padded[..., rows, cols])
        if prob_sum is None:  # the number of classes is known after the first forward pass
            prob_sum = window_probs.new_zeros(
                (images.shape[0], window_probs.shape[1], padded_height, padded_width))
        prob_sum[..., rows, cols] += window_probs
    window_count = sliding_window_counts(padded_height, padded_width, window, stride_ratio, images.device)
    return (prob_sum / window_count)[..., :height, :width]


def predict(
    model: torch.nn.Module,
    images: torch.Tensor,
    mode: str = "whole",
    crop_size: Optional[Union[int, Sequence[int]]] = None,
    output_stride: Optional[int] = 16,
    stride_ratio: float = 2 / 3,
) -> Tuple[torch.Tensor, Region]:
    """Probabilities and the (rows, cols) region of ``images`` they cover, for mode
    "whole" | "center_crop" | "sliding" (crop_size is the crop or the window)."""
    if mode not in EVAL_MODES:
        raise ConfigError(f"evaluation mode must be one of {', '.join(EVAL_MODES)}, got {mode!r}")
    if mode == "whole":
        return predict_whole(model, images, output_stride), _FULL_REGION
    if crop_size is None:
        raise ConfigError(f"evaluation mode {mode!r} needs a crop size")
    if mode == "center_crop":
        return predict_center_crop(model, images, crop_size, output_stride)
    return predict_sliding(model, images, crop_size, stride_ratio), _FULL_REGION


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The block runs `model` in eval mode without gradients; its previous mode comes back after,
    also when the block raises (a student evaluated mid-training keeps training)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def evaluate(
    model: torch.nn.Module,
    loader: Iterable[Dict[str, torch.Tensor]],
    num_classes: int,
    mode: str = "whole",
    crop_size: Optional[Union[int, Sequence[int]]] = None,
    ignore_index: int = 255,
    device: Optional[torch.device] = None,
    reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    amp_dtype: Optional[torch.dtype] = None,
    class_names: Optional[Sequence[str]] = None,
    progress: bool = False,
    output_stride: Optional[int] = 16,
    stride_ratio: float = 2 / 3,
) -> Dict[str, object]:
    """Metrics of ``model`` over ``loader`` batches {"image": B×3×H×W, "mask": B×H×W}.

    Runs in eval mode without gradients and restores the model's previous mode. The confusion
    matrix is summed over batches, then passed through ``reduce`` (a cross-rank sum under DDP,
    identity otherwise) so every rank computes the metrics of the whole validation set.
    ``amp_dtype`` (e.g. torch.bfloat16) runs the forward passes under autocast.
    """
    if mode not in EVAL_MODES:
        raise ConfigError(f"evaluation mode must be one of {', '.join(EVAL_MODES)}, got {mode!r}")
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    autocast = (torch.autocast(device_type=device.type, dtype=amp_dtype)
                if amp_dtype is not None else contextlib.nullcontext())

    try:
        total = len(loader)  # type: ignore[arg-type]
    except TypeError:
        total = 0
    with eval_mode(model), Progress(total, desc="eval", every=max(1, total // 10),
                                    enabled=progress and total > 0) as progress_bar:
        for batch in loader:
            images = batch["image"].to(device, non_blocking=True)
            masks = batch["mask"].to(device, non_blocking=True)
            if masks.shape[-2:] != images.shape[-2:]:
                names = batch.get("name", "?")
                names = ", ".join(names) if isinstance(names, (list, tuple)) else str(names)
                raise DataError(f"{names}: image is {tuple(images.shape[-2:])} but mask is "
                                f"{tuple(masks.shape[-2:])}")
            with autocast:
                probs, (rows, cols) = predict(model, images, mode, crop_size, output_stride, stride_ratio)
            confusion += confusion_matrix(probs.argmax(dim=1), masks[:, rows, cols],
                                          num_classes, ignore_index)
            progress_bar.update(1)

    if reduce is not None:
        confusion = reduce(confusion)
    return segmentation_metrics(confusion, class_names)
