"""Loading a trained model from a checkpoint, and evaluating it (`farcluss eval`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import torch
from torch import nn

from farcluss.config import Config, config_from_dict
from farcluss.engine.checkpoint import load_checkpoint, load_model_state
from farcluss.engine.distributed import DistEnv
from farcluss.errors import CheckpointError, ConfigError
from farcluss.methods import build_method


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


def evaluate_checkpoint(cfg: Config, checkpoint: str, model_name: Optional[str] = None,
                        progress: bool = True) -> dict:
    from farcluss.data.build import build_data, eval_loader
    from farcluss.engine.trainer import resolve_device
    from farcluss.evaluate import evaluate

    env = DistEnv()
    device = resolve_device(cfg.train.device, env)
    data = build_data(cfg, need_train=False)
    num_classes = len(data.classes)
    model, saved_cfg, _ = load_trained_model(Path(checkpoint), model_name or cfg.eval.model,
                                             num_classes=num_classes, device=device)
    loader = eval_loader(cfg, data, num_classes, env)
    e = cfg.eval
    return evaluate(model, loader, num_classes, mode=e.mode,
                    crop_size=e.crop_size or cfg.data.crop_size, stride_ratio=e.stride_ratio,
                    ignore_index=cfg.data.ignore_index, device=device,
                    class_names=data.classes, output_stride=saved_cfg.model.output_stride,
                    progress=progress)
