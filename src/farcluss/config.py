"""Typed configuration: a YAML file plus ``--set key=value`` overrides, validated once at load.

Every number a user may want to change lives here. The schema is a tree of dataclasses; field
annotations drive validation, so an unknown key or a wrong type is a one-line `ConfigError`
naming the dotted key. The module knows nothing of torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Tuple, Union

import yaml

from farcluss.errors import ConfigError


@dataclass(frozen=True)
class Bounds:
    """The range of a number field (or of each element of a list field), declared beside the
    field with :func:`bounded`; `validate` checks it and docs/configuration.md prints it.

    ``ordered``: the value is a ``[low, high]`` pair that must also satisfy ``low <= high``.
    """

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    ordered: bool = False

    def admits(self, value: Any) -> bool:
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        if self.ordered and not (len(values) == 2 and values[0] <= values[1]):
            return False
        for v in values:
            if self.low is not None and (v <= self.low if self.low_open else v < self.low):
                return False
            if self.high is not None and (v >= self.high if self.high_open else v > self.high):
                return False
        return True

    def describe(self) -> str:
        """The rule in words, as the error says it: "positive", ">= 0", "in [0, 1)", ..."""
        if self.ordered:
            low = "" if self.low is None else f"{_num(self.low)} {'<' if self.low_open else '<='} "
            high = "" if self.high is None else f" {'<' if self.high_open else '<='} {_num(self.high)}"
            return f"{low}low <= high{high}"
        if self.low is not None and self.high is not None:
            return (f"in {'(' if self.low_open else '['}{_num(self.low)}, {_num(self.high)}"
                    f"{')' if self.high_open else ']'}")
        if self.low is not None:
            if self.low == 0 and self.low_open:
                return "positive"
            return f"{'>' if self.low_open else '>='} {_num(self.low)}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {_num(self.high)}"
        return "any number"


def _num(value: float) -> str:
    return f"{value:g}"


def bounded(default: Any, *, gt: Optional[float] = None, ge: Optional[float] = None,
            lt: Optional[float] = None, le: Optional[float] = None, ordered: bool = False) -> Any:
    """A dataclass field with a declared range: ``lr: float = bounded(0.001, gt=0)``.

    ``gt``/``ge`` and ``lt``/``le`` are the open or closed lower and upper bounds; `None` values
    pass (an optional field that is unset). ``ordered`` marks a ``[low, high]`` pair.
    """
    bounds = Bounds(low=gt if gt is not None else ge, high=lt if lt is not None else le,
                    low_open=gt is not None, high_open=lt is not None, ordered=ordered)
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: type(default)(default), metadata={"bounds": bounds})
    return field(default=default, metadata={"bounds": bounds})


def field_bounds(cls: type) -> dict[str, Bounds]:
    """The declared ranges of a section's fields, by field name."""
    return {f.name: f.metadata["bounds"] for f in dataclasses.fields(cls) if "bounds" in f.metadata}



@dataclass(frozen=True)
class DataConfig:
    """Where the images are and how a weak view is made."""

    #: dataset preset: folder (images/, masks/, classes.txt), voc, voc_blended, cityscapes
    preset: Literal["folder", "voc", "voc_blended", "cityscapes"] = "folder"
    #: dataset folder; split paths are relative to it; builtin:benchmark | builtin:digits = a built-in dataset (made once in the farcluss cache)
    root: str = ""
    #: a file with one class name per line, or the list itself; empty → preset / root/classes.txt
    classes: Union[str, List[str], None] = None
    #: must match the class list when both are given
    num_classes: Optional[int] = bounded(None, ge=2)
    #: split list of labeled samples (`image mask` per line)
    labeled: str = "splits/labeled.txt"
    #: split list of unlabeled samples (`image` per line; a mask column is ignored)
    unlabeled: str = "splits/unlabeled.txt"
    #: split list of validation samples
    val: str = "splits/val.txt"
    #: split list of held-back test samples (`image mask` per line), or null for none: evaluated
    #: beside val at every evaluation but never used to choose anything (best.pt follows val only)
    test: Optional[str] = None
    #: training crop (pixels, square)
    crop_size: int = bounded(321, gt=0)
    #: random rescale range of the weak view
    scale_range: Tuple[float, float] = bounded((0.5, 2.0), gt=0, ordered=True)
    #: horizontal flip probability of the weak view
    flip_prob: float = bounded(0.5, ge=0, le=1)
    #: random rotation of the weak view, uniform in ±degrees (image and mask, the corners ignored); 0 = off
    rotate_degrees: float = bounded(0.0, ge=0, le=180)
    #: mask value that is ignored (also used for crop padding)
    ignore_index: int = bounded(255, ge=0, le=255)
    #: normalisation mean (RGB, 0-1 scale)
    mean: Tuple[float, float, float] = (0.485, 0.456, 0.406)
    #: normalisation std (RGB, 0-1 scale)
    std: Tuple[float, float, float] = bounded((0.229, 0.224, 0.225), gt=0)


@dataclass(frozen=True)
class ModelConfig:
    #: encoder: a ResNet (DeepLabV3+) or a DINOv2 ViT/14 (DPT), S/B/L, `_reg` with 4 register tokens
    backbone: Literal["resnet18", "resnet34", "resnet50", "resnet101", "dinov2_vits14",
                      "dinov2_vitb14", "dinov2_vitl14", "dinov2_vits14_reg", "dinov2_vitb14_reg",
                      "dinov2_vitl14_reg"] = "resnet50"
    #: segmentation model: auto (ResNet → deeplabv3plus, DINOv2 → dpt) | deeplabv3plus | dpt
    arch: Literal["auto", "deeplabv3plus", "dpt"] = "auto"
    #: train the head only: the encoder keeps its (pretrained) weights, gets no gradient and stays out of the optimizer (and its checkpointed state)
    freeze_backbone: bool = False
    #: DINOv2 width override (tiny test models; heads = width / 64, at least 1); None = the variant's
    vit_embed_dim: Optional[int] = None
    #: DINOv2 depth override (tiny test models; the DPT reads the last block of each quarter); None = the variant's
    vit_depth: Optional[int] = bounded(None, ge=1)
    #: ResNet encoder output stride (dilation replaces stride in the last stage(s)); a ViT has patch stride 14
    output_stride: Literal[8, 16] = 16
    #: three 3x3 convs instead of the 7x7 stem (ResNet-v1c, used by UniMatch/mmseg weights)
    deep_stem: bool = False
    #: channels of the first ResNet stage; 64 is the standard network, smaller makes tiny models
    base_width: int = bounded(64, ge=4)
    #: width of the deep stem's convs; None → base_width (UniMatch's ResNet-v1c files use 128)
    stem_width: Optional[int] = None
    #: DeepLabV3+ width: channels of the ASPP output and the stride-4 decoder (256 as published); its 3x3 convs at stride 4 cost with the square of it and dominate a small encoder's step (ResNet-18 w32 at 96 px: 64 channels make a step ~3x cheaper)
    decoder_channels: int = bounded(256, ge=8)
    #: registry name, local file or URL of ImageNet backbone weights; builtin:pretrained = the project's own ResNet encoder (`farcluss pretrain`, made once under ~/.cache/farcluss, sha256-checked), builtin:pretrained@N = the same pretrained for N iterations instead of 3,000; None = random init
    pretrained: Optional[str] = None
    #: expected sha256 (or prefix) of the pretrained file
    pretrained_sha256: Optional[str] = None


@dataclass(frozen=True)
class MethodConfig:
    """The semi-supervised method and every FARCLUSS reading (docs/method.md §0–§6)."""

    #: supervised | fixmatch | unimatch | farcluss
    name: Literal["supervised", "fixmatch", "unimatch", "farcluss"] = "farcluss"
    #: where pseudo-labels come from: ema (a mean teacher) | online (the student itself, no gradient: UniMatch V1); None → the method's default (fixmatch, farcluss: ema; unimatch: online)
    teacher: Optional[Literal["ema", "online"]] = None
    #: strong views of each unlabeled image, each with its own photometric draw and CutMix box; None → the method's default (fixmatch, farcluss: 1; unimatch: 2)
    strong_views: Optional[int] = None
    #: feature perturbation: off | dropout (UniMatch V1: a channel-dropout copy of the weak view's encoder features, its own loss term) | complementary (UniMatch V2: complementary channel masks on the two strong views); None → the method's default (fixmatch, farcluss: off; unimatch: dropout)
    feature_perturbation: Optional[Literal["off", "dropout", "complementary"]] = None
    #: share of the unlabeled weight on the feature-perturbation term (dropout); the strong views share the rest equally (UniMatch: 0.5)
    fp_share: float = bounded(0.5, ge=0, lt=1)
    #: channel dropout probability of feature_perturbation=dropout (UniMatch: Dropout2d(0.5))
    fp_drop_prob: float = bounded(0.5, ge=0, lt=1)
    #: feature_perturbation=complementary leaves a pair of views unperturbed with this probability (UniMatch V2: half the batch)
    fp_keep_prob: float = bounded(0.5, ge=0, le=1)
    #: teacher EMA momentum m; per step min(1 - 1/(t+1), m)
    ema_momentum: float = bounded(0.999, ge=0, le=1)
    #: weight of the unlabeled loss
    lambda_u: float = bounded(1.0, ge=0)
    #: supervised-only iterations before the unlabeled loss starts; the teacher restarts then
    warmup_iterations: int = bounded(0, ge=0)
    #: fraction of all iterations over which r(t) ramps linearly from 0 to 1 after warm-up
    ramp: float = bounded(0.05, ge=0, le=1)
    #: confidence threshold on the teacher; None → 0.95 for fixmatch, 0 (off) for farcluss
    threshold: Optional[float] = bounded(None, ge=0, lt=1)
    #: distribution alignment of the teacher's probabilities before pseudo-labels, targets and weights (docs/method.md §1b; not in the paper): off | labels (p_c · π_c / p̄_c, π the labeled pixels' class prior, p̄ the teacher's mean prediction on unlabeled pixels, both running means)
    distribution_alignment: Literal["off", "labels"] = "off"
    #: momentum of the running means π and p̄ of distribution_alignment=labels (0.99: about the last 100 iterations)
    alignment_momentum: float = bounded(0.99, ge=0, lt=1)
    #: K of the fuzzy top-K targets (1 = hard pseudo-labels, C = full distribution)
    top_k: int = bounded(3, ge=1)
    #: temperature on teacher probabilities before top-K
    temperature: float = bounded(1.0, gt=0)
    #: pixel weight u(x): none | entropy 1-H/log C | exp exp(-beta H/log C) | power (1-H/log C)^gamma
    weighting: Literal["none", "entropy", "exp", "power"] = "entropy"
    #: beta of weighting=exp
    weighting_beta: float = bounded(1.0, gt=0)
    #: gamma of weighting=power
    weighting_gamma: float = bounded(1.0, gt=0)
    #: class weights from pseudo-label counts: off | batch (this batch) | ema (EMA of counts)
    rebalance: Literal["off", "batch", "ema"] = "batch"
    #: exponent alpha of w_c = (N / (C_b n_c))^alpha
    rebalance_alpha: float = bounded(1.0, ge=0)
    #: class weights are clipped to this range after mean-normalisation
    rebalance_clip: Tuple[float, float] = bounded((0.1, 10.0), gt=0, ordered=True)
    #: weights are scaled to mean 1 over the present classes (docs/method.md) or over the pixels, which keeps the unlabeled loss at its scale
    rebalance_normalize: Literal["classes", "pixels"] = "classes"
    #: EMA momentum of the class counts (rebalance=ema)
    rebalance_momentum: float = bounded(0.99, ge=0, lt=1)
    #: "pixel": w_{argmax q} multiplies the pixel loss (docs/method.md default); "inside": −Σ_c w_c q_c log p_c
    rebalance_apply: Literal["pixel", "inside"] = "pixel"
    #: denominator of L_unsup: valid (the valid pixel count, docs/method.md) | weights (the sum of u·w: a weighted mean that keeps the loss at its scale)
    unsup_normalize: Literal["valid", "weights"] = "valid"
    #: prototype contrastive loss on the decoder feature: off | prototype
    contrastive: Literal["off", "prototype"] = "prototype"
    #: weight of the contrastive loss (0 skips the projection head)
    lambda_c: float = bounded(0.1, ge=0)
    #: temperature tau of the prototype softmax
    contrastive_temperature: float = bounded(0.1, gt=0)
    #: pixels sampled per class per iteration for the contrastive loss
    max_pixels_per_class: int = bounded(256, ge=1)
    #: output channels of the projection head
    projection_dim: int = bounded(128, ge=1)
    #: EMA momentum of the prototype bank (stands in for classes absent from a batch)
    prototype_momentum: float = bounded(0.99, ge=0, lt=1)
    #: unlabeled pixels join the contrastive loss when their pixel weight u(x) exceeds this (0: all but uniform ones)
    contrastive_weight_threshold: float = bounded(0.5, ge=0, le=1)


@dataclass(frozen=True)
class AugmentConfig:
    """Strong view of an unlabeled crop (docs/method.md §0); it must not change what an object is."""

    #: colour jitter strength (torchvision semantics)
    brightness: float = bounded(0.5, ge=0)
    #: colour jitter strength (torchvision semantics)
    contrast: float = bounded(0.5, ge=0)
    #: colour jitter strength (torchvision semantics)
    saturation: float = bounded(0.5, ge=0)
    #: hue jitter (fraction of the colour circle); keep small where hue defines a class
    hue: float = bounded(0.25, ge=0, le=0.5)
    #: probability of colour jitter per image
    jitter_prob: float = bounded(0.8, ge=0, le=1)
    #: probability of grayscale per image
    grayscale_prob: float = bounded(0.2, ge=0, le=1)
    #: probability of Gaussian blur per image
    blur_prob: float = bounded(0.5, ge=0, le=1)
    #: Gaussian blur sigma range
    blur_sigma: Tuple[float, float] = bounded((0.1, 2.0), gt=0, ordered=True)
    #: probability that an image gets a CutMix box from another image of the batch
    cutmix_prob: float = bounded(0.5, ge=0, le=1)
    #: CutMix box area as a fraction of the crop
    cutmix_area: Tuple[float, float] = bounded((0.02, 0.4), gt=0, lt=1, ordered=True)
    #: CutMix box aspect ratio range
    cutmix_aspect: Tuple[float, float] = bounded((0.3, 3.3), gt=0, ordered=True)


#: the signals `train.stop_signals` may name (farcluss.engine.signals handles them)
STOP_SIGNAL_NAMES = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2", "SIGHUP", "SIGQUIT")


@dataclass(frozen=True)
class TrainConfig:
    #: training iterations (the poly schedule ends here)
    iterations: int = bounded(1000, gt=0)
    #: None: run train.iterations; E: run E passes over the unlabeled images instead (supervised
    #: too, so compared methods run alike; the labeled ones when there is no unlabeled list),
    #: ceil(E × images / (batch × world size)) iterations, which replace train.iterations
    #: (epochs wins when both are set; the log says so)
    epochs: Optional[float] = bounded(None, gt=0)
    #: labeled images per process per iteration
    batch_size: int = bounded(8, gt=0)
    #: unlabeled images per process per iteration; None → batch_size
    unlabeled_batch_size: Optional[int] = bounded(None, gt=0)
    #: sgd (momentum, DeepLab recipes) | adamw (decoupled weight decay, UniMatch V2's DINOv2 recipes)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    #: base learning rate of the backbone
    lr: float = bounded(0.001, gt=0)
    #: learning-rate factor of everything that is not the backbone
    head_lr_multiplier: float = bounded(10.0, gt=0)
    #: SGD momentum
    momentum: float = bounded(0.9, ge=0, lt=1)
    #: AdamW (beta1, beta2)
    betas: Tuple[float, float] = bounded((0.9, 0.999), ge=0, lt=1)
    #: weight decay (SGD: L2 in the gradient; AdamW: decoupled, V2 uses 0.01)
    weight_decay: float = bounded(1e-4, ge=0)
    #: lr_t = lr (1 - t/T)^power
    poly_power: float = 0.9
    #: supervised loss: ce | ohem
    loss: Literal["ce", "ohem"] = "ce"
    #: OHEM keeps pixels whose true-class probability is below this
    ohem_threshold: float = bounded(0.7, gt=0, le=1)
    #: OHEM keeps at least this many pixels per batch
    ohem_min_kept: int = bounded(200000, ge=0)
    #: logit adjustment of the supervised loss (Menon et al. 2021): τ in s_c + τ·log π_c, π the running class frequency of the labeled pixels; trains logits for a class-balanced prediction on long-tailed labels; 0 = off
    logit_adjustment: float = bounded(0.0, ge=0)
    #: momentum of that running class frequency (per iteration)
    logit_adjustment_momentum: float = bounded(0.99, ge=0, lt=1)
    #: seed of model init, data order, augmentation
    seed: int = bounded(0, ge=0)
    #: evaluate teacher and student every N iterations (and at the end)
    eval_interval: int = bounded(500, gt=0)
    #: write a train line to metrics.jsonl every N iterations
    log_interval: int = bounded(20, gt=0)
    #: write checkpoints/last.pt every N iterations (and at the end)
    checkpoint_interval: int = bounded(500, gt=0)
    #: auto | cpu | cuda | cuda:N
    device: str = "auto"
    #: data-loader worker processes per training process
    num_workers: int = bounded(2, ge=0)
    #: mixed precision: off | auto (bf16 on CPUs with AVX-512 BF16 or AMX, where it is ~2x faster; fp32 elsewhere and on CUDA) | bf16 | fp16 (CUDA, with a GradScaler)
    amp: Literal["off", "auto", "bf16", "fp16"] = "auto"
    #: NHWC memory layout (faster convolutions on recent GPUs)
    channels_last: bool = False
    #: SyncBatchNorm across ranks (CUDA + DDP only)
    sync_bn: bool = True
    #: BatchNorm layers use and keep their running statistics (affine weights still train): for
    #: tiny per-process batches, or to make W ranks × batch b exactly one process × batch W·b
    freeze_bn: bool = False
    #: deterministic algorithms (bitwise reproducible runs and resumes on CPU)
    deterministic: bool = False
    #: on a non-finite loss: stop with an error, or skip the step
    nan_policy: Literal["stop", "skip"] = "stop"
    #: also write TensorBoard scalars (needs the tensorboard package)
    tensorboard: bool = False
    #: show progress: a bar when stderr is a terminal, else a line every train.log_interval iterations
    progress: bool = True
    #: signals that stop the run after the current iteration, with last.pt saved and exit
    #: status 128 + signal number (143 for SIGTERM); any of SIGTERM, SIGINT, SIGUSR1, SIGUSR2,
    #: SIGHUP, SIGQUIT; [] keeps the default actions (docs/distributed.md)
    stop_signals: List[str] = field(default_factory=lambda: ["SIGTERM", "SIGINT", "SIGUSR1"])
    #: seconds a collective waits for the other ranks before the run fails (a rank that died
    #: or hangs); under DDP only
    dist_timeout: float = bounded(1800.0, gt=0)


@dataclass(frozen=True)
class EvalConfig:
    #: whole image | center_crop | sliding window
    mode: Literal["whole", "center_crop", "sliding"] = "whole"
    #: window of sliding / centre-crop evaluation; None → data.crop_size
    crop_size: Optional[int] = bounded(None, gt=0)
    #: sliding-window stride as a fraction of the window
    stride_ratio: float = bounded(2.0 / 3.0, gt=0, le=1)
    #: which model `farcluss eval` and `predict` use when the checkpoint has both
    model: Literal["teacher", "student"] = "teacher"
    #: None: every validation (and test) image; N: the first N of each (quick looks during training)
    max_images: Optional[int] = bounded(None, gt=0)


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))

    def num_classes_hint(self) -> Optional[int]:
        """Class count known from config alone (a list or num_classes); None when a file decides."""
        if self.data.num_classes is not None:
            return self.data.num_classes
        if isinstance(self.data.classes, list):
            return len(self.data.classes)
        return None


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin is Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, List):
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin in (tuple, Tuple):
        args = typing.get_args(tp)
        return f"list of {len(args)} {_type_name(args[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


class _Mismatch(Exception):
    pass


def _coerce(value: Any, tp: Any) -> Any:
    """Return `value` as type `tp` or raise `_Mismatch`; ints widen to floats, nothing else."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
        raise _Mismatch
    if origin is Union:
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is Literal:
        if isinstance(value, bool) and not value and "off" in typing.get_args(tp):
            # YAML 1.1 reads a bare `off` (in a file or --set) as false
            value = "off"
        for option in typing.get_args(tp):
            if value == option and type(value) is type(option):
                return value
        raise _Mismatch
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        (item,) = typing.get_args(tp)
        return [_coerce(v, item) for v in value]
    if origin in (tuple, Tuple):
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise _Mismatch
        return tuple(_coerce(v, a) for v, a in zip(value, args))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    raise TypeError(f"unsupported config annotation {tp!r}")


def _closest(key: str, options: list[str]) -> str:
    match = difflib.get_close_matches(key, options, n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def all_keys() -> list[str]:
    """Every dotted key of the schema, e.g. ``train.lr``."""
    keys = []
    for section, cls in typing.get_type_hints(Config).items():
        for name in typing.get_type_hints(cls):
            keys.append(f"{section}.{name}")
    return keys


def _apply(cfg: Config, key: str, value: Any) -> None:
    parts = key.split(".")
    section_hints = typing.get_type_hints(Config)
    if len(parts) != 2 or parts[0] not in section_hints:
        raise ConfigError(f"unknown config key '{key}'{_closest(key, all_keys())}")
    section, name = parts
    hints = typing.get_type_hints(section_hints[section])
    if name not in hints:
        raise ConfigError(f"unknown config key '{key}'{_closest(key, all_keys())}")
    try:
        coerced = _coerce(value, hints[name])
    except _Mismatch:
        raise ConfigError(
            f"config key '{key}' must be {_type_name(hints[name])}, got {value!r}"
        ) from None
    # the loaded config is frozen; only the loader writes its fields
    object.__setattr__(getattr(cfg, section), name, coerced)


def _flatten(tree: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if not isinstance(tree, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<top>'}' must be a mapping")
    items = []
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if not prefix and isinstance(value, dict):
            items.extend(_flatten(value, dotted + "."))
        elif not prefix:
            raise ConfigError(f"unknown config key '{dotted}'{_closest(dotted, all_keys())}")
        else:
            items.append((dotted, value))
    return items


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` → (key, YAML-parsed value); ``data.classes=[a,b]`` gives a list."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got '{text}'")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(
    path: Union[str, Path, None] = None,
    overrides: Optional[list[str]] = None,
    base: Optional[dict] = None,
) -> Config:
    """Build a validated `Config` from defaults, an optional base dict, a YAML file and overrides.

    A YAML file may name ``_base_: other.yaml`` (relative to itself) to inherit from it.
    """
    cfg = Config()
    layers: list[dict] = []
    if base:
        layers.append(base)
    if path is not None:
        layers.extend(_read_yaml_chain(Path(path)))
    for layer in layers:
        for key, value in _flatten(layer):
            _apply(cfg, key, value)
    for text in overrides or []:
        key, value = parse_override(text)
        _apply(cfg, key, value)
    validate(cfg)
    return cfg


def _read_yaml_chain(path: Path, seen: Optional[set] = None) -> list[dict]:
    seen = seen or set()
    if path.resolve() in seen:
        raise ConfigError(f"config {path} includes itself through _base_")
    seen.add(path.resolve())
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_bytes().decode("utf-8")) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"config {path} is not a text file (a YAML config is UTF-8 text)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config {path}{where} is not valid YAML") from None
    except RecursionError:
        raise ConfigError(f"config {path} is not valid YAML (nested too deeply)") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config {path} must be a mapping of sections")
    base_name = tree.pop("_base_", None)
    layers = []
    if base_name is not None:
        layers.extend(_read_yaml_chain(path.parent / str(base_name), seen))
    layers.append(tree)
    return layers


def config_from_dict(tree: dict) -> Config:
    """Rebuild a config saved in a run folder or checkpoint (validated again)."""
    return load_config(base=tree)


def derive_config(cfg: Config, changes: Dict[str, Any]) -> Config:
    """A validated copy of `cfg` with dotted keys replaced, e.g. {"train.seed": 1}."""
    tree = cfg.to_dict()
    for key, value in changes.items():
        section, name = key.split(".")
        tree[section][name] = value
    return config_from_dict(tree)


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"config key '{key}' {message}")


def validate(cfg: Config) -> None:
    """Every declared range (`bounded` fields), then the cross-field checks types and ranges
    alone cannot express."""
    for section in SECTIONS:
        values = getattr(cfg, section)
        for name, bounds in field_bounds(type(values)).items():
            value = getattr(values, name)
            if value is not None:
                _require(bounds.admits(value), f"{section}.{name}", f"must be {bounds.describe()}")
    d, a, t = cfg.data, cfg.method, cfg.train
    if d.num_classes is not None:
        _require(d.num_classes <= d.ignore_index or d.ignore_index < 0, "data.num_classes",
                 f"must not reach the ignore label {d.ignore_index}")
    if isinstance(d.classes, list):
        _require(len(d.classes) >= 2, "data.classes", "must list at least 2 classes")
        if d.num_classes is not None:
            _require(len(d.classes) == d.num_classes, "data.classes",
                     f"lists {len(d.classes)} classes but data.num_classes is {d.num_classes}")
    m = cfg.model
    if m.deep_stem and m.stem_width is not None:
        _require(m.stem_width % 2 == 0, "model.stem_width", "must be even (the deep stem halves it)")
    arch = resolved_arch(cfg)
    vit = m.backbone.startswith("dinov2")
    if m.arch != "auto":
        _require(arch == ("dpt" if vit else "deeplabv3plus"), "model.arch",
                 f"is {m.arch}, which does not take the {m.backbone} backbone "
                 f"({'dpt' if vit else 'deeplabv3plus'} does; or model.arch=auto)")
    if m.vit_embed_dim is not None:
        _require(vit, "model.vit_embed_dim", "applies to dinov2 backbones only")
        heads = max(1, m.vit_embed_dim // 64)
        _require(m.vit_embed_dim >= 8 and m.vit_embed_dim % heads == 0, "model.vit_embed_dim",
                 f"must be >= 8 and divisible by its {heads} head(s) of 64 channels")
    if m.vit_depth is not None:
        _require(vit, "model.vit_depth", "applies to dinov2 backbones only")
    if a.strong_views is not None:
        _require(a.strong_views in (1, 2), "method.strong_views", "must be 1 or 2")
    skeleton = resolved_skeleton(cfg)
    if skeleton.feature_perturbation == "complementary":
        _require(skeleton.strong_views == 2, "method.feature_perturbation",
                 "complementary needs method.strong_views=2 (the masks pair the two views)")
    n_classes = cfg.num_classes_hint()
    if n_classes is not None:
        _require(a.top_k <= n_classes, "method.top_k",
                 f"is {a.top_k} but there are only {n_classes} classes")
    # the clip keeps w = 1 (a class at its expected frequency) reachable
    _require(a.rebalance_clip[0] <= 1 <= a.rebalance_clip[1], "method.rebalance_clip",
             "must be [low, high] with 0 < low <= 1 <= high")
    for name in t.stop_signals:
        _require(name in STOP_SIGNAL_NAMES, "train.stop_signals",
                 f"lists {name!r}; choose from {', '.join(STOP_SIGNAL_NAMES)}")
    _require(t.device == "auto" or t.device == "cpu" or t.device.startswith("cuda"),
             "train.device", "must be auto, cpu, cuda or cuda:N")


def resolved_arch(cfg: Config) -> str:
    """The segmentation model in force: explicit, else DPT for a DINOv2 encoder and DeepLabV3+
    for a ResNet."""
    if cfg.model.arch != "auto":
        return cfg.model.arch
    return "dpt" if cfg.model.backbone.startswith("dinov2") else "deeplabv3plus"


def input_stride(cfg: Config) -> int:
    """What whole-image inference pads an image to a multiple of: the ResNet's output stride,
    or the ViT's patch size (14)."""
    return 14 if resolved_arch(cfg) == "dpt" else cfg.model.output_stride


def resolved_threshold(cfg: Config) -> float:
    """The confidence threshold in force: explicit, else 0.95 for fixmatch and unimatch, 0
    otherwise."""
    if cfg.method.threshold is not None:
        return cfg.method.threshold
    return 0.95 if cfg.method.name in ("fixmatch", "unimatch") else 0.0


@dataclass(frozen=True)
class Skeleton:
    """The mean-teacher skeleton a method rides on (see `MethodConfig.teacher` and below)."""

    teacher: str
    strong_views: int
    feature_perturbation: str


#: each method's skeleton when `method.teacher`, `strong_views`, `feature_perturbation` are None
DEFAULT_SKELETONS = {
    "supervised": Skeleton("ema", 1, "off"),
    "fixmatch": Skeleton("ema", 1, "off"),
    "unimatch": Skeleton("online", 2, "dropout"),
    "farcluss": Skeleton("ema", 1, "off"),
}


def resolved_skeleton(cfg: Config) -> Skeleton:
    """The skeleton in force: each value explicit in the config, else the method's default."""
    m = cfg.method
    default = DEFAULT_SKELETONS[m.name]
    return Skeleton(
        teacher=m.teacher if m.teacher is not None else default.teacher,
        strong_views=m.strong_views if m.strong_views is not None else default.strong_views,
        feature_perturbation=(m.feature_perturbation if m.feature_perturbation is not None
                              else default.feature_perturbation),
    )


def dump_config(cfg: Config, path: Union[str, Path]) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def _field_docs(cls: type) -> dict[str, str]:
    """The ``#:`` comments written above fields in this file, by field name."""
    docs: dict[str, str] = {}
    pending: list[str] = []
    for line in inspect.getsource(cls).splitlines():
        stripped = line.strip()
        if stripped.startswith("#:"):
            pending.append(stripped[2:].strip())
        elif re.match(r"^[A-Za-z_]\w*\s*:", stripped):
            name = stripped.split(":", 1)[0].strip()
            if pending:
                docs[name] = " ".join(pending)
            pending = []
        else:
            pending = []
    return docs


def describe_schema() -> str:
    """Markdown reference of every key, its type, default and meaning (docs/configuration.md)."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    defaults = Config().to_dict()
    for section, cls in typing.get_type_hints(Config).items():
        docs = _field_docs(cls)
        ranges = field_bounds(cls)
        for name, tp in typing.get_type_hints(cls).items():
            default = defaults[section][name]
            type_text = _type_name(tp).replace("|", "\\|")
            meaning = docs.get(name, "")
            if name in ranges:
                meaning += f" (must be {ranges[name].describe()})"
            meaning = meaning.replace("|", "\\|")
            lines.append(f"| `{section}.{name}` | {type_text} | `{default!r}` | {meaning} |")
    return "\n".join(lines)


def write_reference(path: Union[str, Path]) -> None:
    """Regenerate docs/configuration.md (`python -m farcluss.config docs/configuration.md`)."""
    header = (
        "# Configuration reference\n\n"
        "Generated from `src/farcluss/config.py` by `python -m farcluss.config docs/configuration.md`;\n"
        "a test fails when it is out of date. Set any key in a YAML file (sections as mappings,\n"
        "`_base_: other.yaml` to inherit) or on the command line with `--set section.key=value`\n"
        "(values are parsed as YAML: `--set data.scale_range=[1,1]`).\n\n"
    )
    Path(path).write_text(header + describe_schema() + "\n")


if __name__ == "__main__":
    write_reference(sys.argv[1] if len(sys.argv) > 1 else "docs/configuration.md")
