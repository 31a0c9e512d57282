"""Running a trained model: loading it from a run checkpoint, choosing the device it runs on,
evaluating it (`farcluss eval`) and predicting validation examples for the reports.

Everything here is used by a command after training (`eval`, `predict`, `export`, `report`,
`demo`); the trainer does not import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from farcluss.config import Config, config_from_dict, input_stride
from farcluss.data.build import EvalSplit, build_data, eval_loader
from farcluss.data.io import load_image, load_mask
from farcluss.data.splits import Sample
from farcluss.data.transforms import image_to_tensor
from farcluss.engine.checkpoint import load_checkpoint, load_model_state
from farcluss.engine.distributed import DistEnv
from farcluss.engine.device import resolve_device
from farcluss.errors import CheckpointError, ConfigError
from farcluss.evaluate import eval_mode, evaluate, predict
from farcluss.methods import build_method


def resolve_inference_device(name: str) -> torch.device:
    """``auto`` → the first GPU when there is one, else the CPU; otherwise the named device.
    A run may be evaluated or reported on another machine than the one it trained on."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available")
    return device


def load_trained_model(path, model_name: str = "teacher", num_classes: Optional[int] = None,
                       device: Optional[torch.device] = None) -> Tuple[nn.Module, Config, list]:
    """The teacher (or student) of a run checkpoint, in eval mode.

    The architecture comes from the config saved in the checkpoint; `num_classes` (from the
    config of the data being evaluated) must agree with it, or loading names the shape mismatch.
    """
    state = load_checkpoint(path)
    for key in ("config", "student"):
        if key not in state:
            raise CheckpointError(f"checkpoint {path} has no '{key}' entry: not a farcluss run checkpoint")
    try:
        saved_cfg = config_from_dict(state["config"])
    except ConfigError as exc:
        raise CheckpointError(f"checkpoint {path} carries an invalid config: {exc}") from None
    classes = list(state.get("classes") or [])
    n = num_classes if num_classes is not None else len(classes)
    method = build_method(saved_cfg, n)
    model = method.build_student()
    weights = state.get(model_name) if model_name == "teacher" else state["student"]
    if weights is None:
        weights = state["student"]  # a supervised run has no teacher: its student is the model
    load_model_state(model, weights, str(path))
    model.eval()
    if device is not None:
        model.to(device)
    return model, saved_cfg, classes


def checkpoint_models(path) -> Tuple[str, ...]:
    """The models a run checkpoint holds: ("teacher", "student"), or ("student",) for a run
    without a teacher (supervised)."""
    has_teacher = load_checkpoint(path, map_location="cpu").get("teacher") is not None
    return ("teacher", "student") if has_teacher else ("student",)


def evaluate_checkpoint(cfg: Config, checkpoint: str, model_name: Optional[str] = None,
                        progress: bool = True, split: EvalSplit = "val") -> dict:
    """Metrics of a checkpoint's `model_name` (default ``eval.model``) on the `split` list of
    `cfg` (``val``, or ``test`` = ``data.test``), evaluated as `cfg.eval` says, on
    `train.device`."""
    env = DistEnv()
    device = resolve_device(cfg.train.device, env)
    data = build_data(cfg, need_train=False)
    num_classes = len(data.classes)
    model, saved_cfg, _ = load_trained_model(Path(checkpoint), model_name or cfg.eval.model,
                                             num_classes=num_classes, device=device)
    loader = eval_loader(cfg, data, num_classes, env, split=split)
    e = cfg.eval
    return evaluate(model, loader, num_classes, mode=e.mode,
                    crop_size=e.crop_size or cfg.data.crop_size, stride_ratio=e.stride_ratio,
                    ignore_index=cfg.data.ignore_index, device=device,
                    class_names=data.classes, output_stride=input_stride(saved_cfg),
                    progress=progress)


# ---- validation examples for reports ----------------------------------------------------------
def load_validation_examples(cfg: Config, samples: Sequence[Sample], num_classes: int,
                             count: int) -> Tuple[List[np.ndarray], List[np.ndarray], List[str]]:
    """The first `count` samples as (RGB uint8 arrays, index masks, names)."""
    chosen = list(samples)[:count]
    images = [np.asarray(load_image(s.image)) for s in chosen]
    masks = [load_mask(s.mask, num_classes, cfg.data.ignore_index) for s in chosen]
    return images, masks, [s.name for s in chosen]


def predict_masks(model: nn.Module, cfg: Config, images: Sequence[np.ndarray],
                  device: Optional[torch.device] = None) -> List[np.ndarray]:
    """Index masks of `model` on RGB uint8 images with the config's evaluation mode; pixels outside
    a centre crop are `ignore_index` (not predicted)."""
    if device is None:
        device = next(model.parameters()).device
    e, d = cfg.eval, cfg.data
    masks = []
    with eval_mode(model):
        for image in images:
            batch = image_to_tensor(image, d.mean, d.std).unsqueeze(0).to(device)
            probs, (rows, cols) = predict(model, batch, e.mode, e.crop_size or d.crop_size,
                                          input_stride(cfg), e.stride_ratio)
            full = np.full(image.shape[:2], d.ignore_index, np.int64)
            full[rows, cols] = probs.argmax(dim=1)[0].cpu().numpy()
            masks.append(full)
    return masks


@dataclass
class ValidationPredictions:
    """The first validation images of a config with their ground truth and the index masks each
    model predicts: what a prediction grid shows."""

    images: List[np.ndarray]
    masks: List[np.ndarray]
    names: List[str]
    class_names: List[str]
    #: label (a column of the grid) → one index mask per image
    predictions: Dict[str, List[np.ndarray]]


def predict_validation_examples(cfg: Config, models: Mapping[str, Tuple[Path, str]],
                                num_images: int) -> ValidationPredictions:
    """Predict the first `num_images` validation images of `cfg` with each of `models`
    (label → (checkpoint, "teacher" | "student")), on the GPU when there is one."""
    data = build_data(cfg, need_train=False)
    num_classes = len(data.classes)
    images, masks, names = load_validation_examples(cfg, data.val, num_classes, num_images)
    device = resolve_inference_device("auto")
    predictions = {}
    for label, (checkpoint, model_name) in models.items():
        if not Path(checkpoint).is_file():
            raise CheckpointError(f"no checkpoint {checkpoint}")
        model, _, _ = load_trained_model(checkpoint, model_name, num_classes=num_classes, device=device)
        predictions[label] = predict_masks(model, cfg, images, device)
    return ValidationPredictions(images, masks, names, list(data.classes), predictions)
