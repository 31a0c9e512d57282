"""`farcluss export`: a trained model to ONNX, checked against ONNX Runtime.

The exported graph takes ``images`` (B×3×H×W float32, normalised with the mean/std stored in
the file's metadata) and returns ``logits`` (B×C×H×W at the input size); batch, height and width
are dynamic. Like ``farcluss predict``, feed sizes that are multiples of the output stride (pad
the bottom/right with zeros after normalising) for the closest match to evaluation.

After writing, the file is run in ONNX Runtime on a random image of another batch size and
spatial size than the one traced, and the largest absolute logit difference to PyTorch is
printed; the command fails when it exceeds 1e-3 + 1e-5 · max |logit| (see
:func:`allowed_difference`).

onnx and onnxruntime are an optional extra: ``pip install farcluss[onnx]``.
"""

from __future__ import annotations

import argparse
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from farcluss.cli_args import add_checkpoint_args
from farcluss.config import input_stride
from farcluss.errors import ConfigError, FarclussError, one_line
from farcluss.inference import load_trained_model

PathLike = Union[str, Path]

DEFAULT_OPSET = 17
#: Resize with sizes known only at run time (the decoder's upsampling) needs opset 11
MIN_OPSET = 11
DEFAULT_TOLERANCE = 1e-3
#: two correct float32 implementations of a deep network differ by ~1e-6 of the logit scale
#: (float32 keeps ~7 digits); logits of ±1000, as a briefly trained model has, would fail 1e-3
#: alone, so the allowed difference grows by this fraction of the largest logit
RELATIVE_TOLERANCE = 1e-5
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
_DYNAMIC_AXES = {0: "batch", 2: "height", 3: "width"}


class ExportError(FarclussError):
    """The export failed or the exported graph does not reproduce the PyTorch logits."""


class LogitsOnly(nn.Module):
    """The segmentation model without its decoder feature: images → logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)[0]


@dataclass
class ExportReport:
    path: Path
    opset: int
    traced_shape: Tuple[int, int, int, int]
    checked_shape: Tuple[int, int, int, int]
    max_abs_logit: float
    max_abs_diff: float
    allowed_diff: float


def allowed_difference(max_abs_logit: float, tolerance: float = DEFAULT_TOLERANCE,
                       relative_tolerance: float = RELATIVE_TOLERANCE) -> float:
    """The largest accepted |logit_onnx − logit_torch|:

        allowed = tolerance + relative_tolerance · max |logit_torch|

    For a trained model (logits of tens) this is the tolerance itself; it grows only where
    float32 rounding alone would exceed it.
    """
    return tolerance + relative_tolerance * max_abs_logit


def _require_onnx():
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise ExportError("ONNX export needs onnx and onnxruntime: "
                          "pip install farcluss[onnx]") from None
    return onnx, onnxruntime


def _check_shape(shape: Sequence[int]) -> Tuple[int, int]:
    height, width = (int(side) for side in shape)
    if height < 1 or width < 1:
        raise ConfigError(f"--size must be two positive sides, got {height} {width}")
    return height, width


def check_size(traced: Tuple[int, int], output_stride: int) -> Tuple[int, int]:
    """A spatial size other than ``traced`` for the parity check, not a multiple of the stride
    either, so the check exercises the dynamic axes and the odd-size resize path."""
    height, width = traced
    return height + output_stride + 3, width + 2 * output_stride + 5


def export_onnx(model: nn.Module, path: PathLike, size: Tuple[int, int] = (321, 321),
                opset: int = DEFAULT_OPSET, output_stride: int = 16,
                mean: Sequence[float] = (0.485, 0.456, 0.406),
                std: Sequence[float] = (0.229, 0.224, 0.225),
                class_names: Optional[Sequence[str]] = None,
                tolerance: float = DEFAULT_TOLERANCE, seed: int = 0) -> ExportReport:
    """Export ``model`` (``model(images)[0]`` are logits) to ONNX and check it in ONNX Runtime.

    The graph is traced on one ``size`` image on the CPU, then run by ONNX Runtime on two
    random images of :func:`check_size` (uniform pixels, normalised with ``mean``/``std``)
    beside the PyTorch model:

        max_abs_diff = max |logits_onnx − logits_torch|   over every element

    Raises ``ExportError`` when ``max_abs_diff`` exceeds :func:`allowed_difference` (the file
    is kept for inspection). The file's metadata records the class names, mean, std and output
    stride. ``model`` is moved to the CPU and put in eval mode.
    """
    onnx, onnxruntime = _require_onnx()
    height, width = _check_shape(size)
    if opset < MIN_OPSET:
        raise ConfigError(f"--opset {opset}: dynamic-size export needs opset {MIN_OPSET} or newer")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = LogitsOnly(model).to("cpu").eval()
    generator = torch.Generator().manual_seed(seed)

    def random_images(batch: int, image_size: Tuple[int, int]) -> torch.Tensor:
        pixels = torch.rand((batch, 3) + tuple(image_size), generator=generator)
        mean_t = torch.tensor(mean).view(1, 3, 1, 1)
        std_t = torch.tensor(std).view(1, 3, 1, 1)
        return (pixels - mean_t) / std_t

    traced_input = random_images(1, (height, width))
    with warnings.catch_warnings():
        # torch >= 2.9 defaults to the torch.export-based exporter, which needs the extra
        # onnxscript package; the TorchScript exporter handles this model's dynamic sizes
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        try:
            torch.onnx.export(
                wrapper, (traced_input,), str(path), dynamo=False, opset_version=opset,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: _DYNAMIC_AXES, OUTPUT_NAME: _DYNAMIC_AXES},
                do_constant_folding=True)
        except Exception as error:  # unsupported opset, unsupported operator
            raise ExportError(f"ONNX export to {path} failed (opset {opset}): {one_line(error)}") from error

    proto = onnx.load(str(path))
    metadata = {"producer": "farcluss", "mean": json.dumps(list(mean)),
                "std": json.dumps(list(std)), "output_stride": str(output_stride),
                "input": f"{INPUT_NAME}: B×3×H×W float32, (rgb/255 − mean) / std"}
    if class_names is not None:
        metadata["classes"] = json.dumps(list(class_names))
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))

    checked_size = check_size((height, width), output_stride)
    check_input = random_images(2, checked_size)
    with torch.no_grad():
        expected = wrapper(check_input).numpy()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    actual = session.run([OUTPUT_NAME], {INPUT_NAME: check_input.numpy()})[0]
    if actual.shape != expected.shape:
        raise ExportError(f"ONNX Runtime returned logits of shape {actual.shape} for an input of "
                          f"{tuple(check_input.shape)}; PyTorch returns {expected.shape}")
    max_abs_logit = float(np.abs(expected).max())
    report = ExportReport(path, opset, tuple(traced_input.shape), tuple(check_input.shape),
                          max_abs_logit, float(np.abs(actual - expected).max()),
                          allowed_difference(max_abs_logit, tolerance))
    if not report.max_abs_diff <= report.allowed_diff:  # "not <=" also catches NaN
        raise ExportError(
            f"{path}: ONNX Runtime logits differ from PyTorch by up to {report.max_abs_diff:.3g}, "
            f"more than the allowed {report.allowed_diff:.3g} ({tolerance:g} + "
            f"{RELATIVE_TOLERANCE:g} × max |logit| {max_abs_logit:.3g})")
    return report


def export_checkpoint(checkpoint: PathLike, out: PathLike, model_name: str = "teacher",
                      opset: int = DEFAULT_OPSET, size: Optional[Tuple[int, int]] = None,
                      tolerance: float = DEFAULT_TOLERANCE) -> ExportReport:
    """Export the teacher (or student) of a run checkpoint; ``size`` defaults to its crop size."""
    _require_onnx()  # before loading a large checkpoint
    model, saved_cfg, classes = load_trained_model(Path(checkpoint), model_name,
                                                   device=torch.device("cpu"))
    if size is None:
        side = saved_cfg.eval.crop_size or saved_cfg.data.crop_size
        size = (side, side)
    return export_onnx(model, out, size=size, opset=opset,
                       output_stride=input_stride(saved_cfg), mean=saved_cfg.data.mean,
                       std=saved_cfg.data.std, class_names=classes, tolerance=tolerance)


def cmd_export(args: argparse.Namespace) -> int:
    report = export_checkpoint(args.checkpoint, args.out, model_name=args.model, opset=args.opset,
                               size=tuple(args.size) if args.size else None,
                               tolerance=args.tolerance)
    traced = "×".join(map(str, report.traced_shape))
    checked = "×".join(map(str, report.checked_shape))
    print(f"wrote {report.path} (opset {report.opset}, traced on {traced}, dynamic batch/height/"
          f"width)")
    print(f"onnxruntime check on {checked}: max abs logit difference {report.max_abs_diff:.3g} "
          f"(allowed {report.allowed_diff:.3g} = {args.tolerance:g} + {RELATIVE_TOLERANCE:g} × "
          f"max |logit| {report.max_abs_logit:.3g})")
    return 0


def register_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export", help="export a checkpoint's model to ONNX (checked in onnxruntime)",
        description="Export the teacher (or student) of a run checkpoint to ONNX: input 'images' "
                    "B×3×H×W (normalised with the mean/std in the file's metadata), output "
                    "'logits' B×C×H×W, batch/height/width dynamic. The file is then run in "
                    "onnxruntime on a random input of another size; the largest absolute logit "
                    "difference to PyTorch is printed; above --tolerance + "
                    f"{RELATIVE_TOLERANCE:g} × max |logit| the command fails (exit code 2). "
                    "Needs: pip install farcluss[onnx].")
    add_checkpoint_args(parser)
    parser.add_argument("--out", required=True, help="the .onnx file to write")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                        help=f"ONNX opset version, {MIN_OPSET} or newer (default "
                             f"{DEFAULT_OPSET})")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=None,
                        help="image size to trace with (default: the checkpoint's crop size)")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help=f"accepted absolute logit difference (default "
                             f"{DEFAULT_TOLERANCE:g}), plus {RELATIVE_TOLERANCE:g} × the largest "
                             "logit for float32 rounding")
    parser.set_defaults(func=cmd_export)
