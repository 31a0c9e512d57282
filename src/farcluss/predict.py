"""`farcluss predict`: class-index PNGs, colour overlays and probabilities for images or folders.

For every input image ``<name>`` the output folder receives

- ``<name>.png``: a palette PNG whose pixel values are the predicted class indices
  (:mod:`farcluss.palette` chooses the colours; the file also works as a mask);
- ``<name>_overlay.png``: the image blended half and half with the class colours;
- ``<name>_probs.npy`` with ``--probs``: the softmax probabilities, C×H×W float16;

and ``legend.txt`` lists each class index, name and colour. Files found inside an input folder
keep their sub-folder under the output folder; two inputs that would still write the same name
get ``-2``, ``-3``… appended, with a note on stderr.

Images are read once for their size, grouped by size and run in batches of ``--batch-size``.
An image with a side longer than the sliding size is predicted in overlapping square windows
(``farcluss.evaluate.predict_sliding``), every other image in one pass. An input that cannot be
read is named on stderr and skipped; the others are still written and the exit code is 2.
"""

from __future__ import annotations

import argparse
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from farcluss.cli_args import add_checkpoint_args, non_negative_int, positive_int
from farcluss.config import Config, input_stride
from farcluss.data.io import load_image
from farcluss.data.transforms import image_to_tensor
from farcluss.errors import ConfigError, FarclussError, one_line
from farcluss.evaluate import predict
from farcluss.inference import load_trained_model, resolve_inference_device
from farcluss.log import Progress, get_logger
from farcluss.palette import legend, overlay, save_index_png

logger = get_logger(__name__)

PathLike = Union[str, Path]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
#: images whose longer side exceeds this are predicted in windows, unless the checkpoint's
#: config evaluates with sliding windows (then its window is used)
DEFAULT_SLIDING_SIZE = 1024
EXIT_INPUT_FAILED = 2


@dataclass(frozen=True)
class ImageJob:
    """One input image and the output path stem (relative to the output folder) it writes to."""

    path: Path
    output_stem: Path


@dataclass
class PredictSummary:
    written: List[ImageJob] = field(default_factory=list)
    #: (input, reason) for every input that was skipped
    failed: List[Tuple[Path, str]] = field(default_factory=list)
    #: (job, the name it would have had) for outputs renamed to avoid a collision
    renamed: List[Tuple[ImageJob, Path]] = field(default_factory=list)


# ---- finding the images --------------------------------------------------------------------------
def _is_within(path: Path, folder: Optional[Path]) -> bool:
    if folder is None:
        return False
    try:
        path.resolve().relative_to(folder)
        return True
    except ValueError:
        return False


def _images_under(folder: Path, exclude: Optional[Path]) -> List[Path]:
    found = []
    for path in sorted(folder.rglob("*")):
        relative_parts = path.relative_to(folder).parts
        if any(part.startswith(".") for part in relative_parts):
            continue  # hidden files and folders (.git, .ipynb_checkpoints, ...)
        if (path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
                and not _is_within(path, exclude)):
            found.append(path)
    return found


def find_images(inputs: Sequence[PathLike], exclude: Optional[PathLike] = None
                ) -> Tuple[List[ImageJob], List[Tuple[Path, str]], List[Tuple[ImageJob, Path]]]:
    """Expand files and folders (searched recursively) into jobs with distinct output stems.

    A file given by name is taken whatever its suffix; inside folders only ``IMAGE_SUFFIXES``
    count, and nothing under ``exclude`` (the output folder, so that a second run does not
    predict the first run's PNGs). Returns ``(jobs, failed, renamed)``: ``failed`` holds
    (input, reason) for inputs that do not exist or hold no image, ``renamed`` the jobs whose
    natural stem was taken by an earlier input, with that stem.
    """
    exclude_dir = Path(exclude).resolve() if exclude is not None else None
    candidates: List[Tuple[Path, Path]] = []
    failed: List[Tuple[Path, str]] = []
    for raw in inputs:
        source = Path(raw).expanduser()
        if source.is_dir():
            images = _images_under(source, exclude_dir)
            if not images:
                failed.append((source, f"folder holds no {'/'.join(IMAGE_SUFFIXES)} image"))
            candidates.extend((image, image.relative_to(source).with_suffix(""))
                              for image in images)
        elif source.is_file():
            candidates.append((source, Path(source.stem)))
        else:
            failed.append((source, "not found"))

    jobs: List[ImageJob] = []
    renamed: List[Tuple[ImageJob, Path]] = []
    seen_files = set()
    taken = set()  # lower case: "A.png" and "a.png" are one file on macOS and Windows
    for path, stem in candidates:
        resolved = path.resolve()
        if resolved in seen_files:
            continue  # the same file reached twice (listed and inside a listed folder)
        seen_files.add(resolved)
        output_stem, copy = stem, 1
        while output_stem.as_posix().lower() in taken:
            copy += 1
            output_stem = stem.with_name(f"{stem.name}-{copy}")
        taken.add(output_stem.as_posix().lower())
        job = ImageJob(path, output_stem)
        jobs.append(job)
        if copy > 1:
            renamed.append((job, stem))
    return jobs, failed, renamed


def _image_size(path: Path) -> Tuple[int, int]:
    """(height, width) read from the header alone, without decoding the pixels."""
    with Image.open(path) as image:
        width, height = image.size
    return height, width


def group_by_size(jobs: Iterable[ImageJob], batch_size: int
                  ) -> Tuple[List[List[ImageJob]], List[Tuple[Path, str]]]:
    """Batches of at most ``batch_size`` same-size images, and the inputs whose header failed."""
    groups: Dict[Tuple[int, int], List[ImageJob]] = OrderedDict()
    failed: List[Tuple[Path, str]] = []
    for job in jobs:
        try:
            size = _image_size(job.path)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
            failed.append((job.path, _reason(error)))
            continue
        groups.setdefault(size, []).append(job)
    batches = [group[start:start + batch_size]
               for group in groups.values() for start in range(0, len(group), batch_size)]
    return batches, failed


def _reason(error: BaseException) -> str:
    if isinstance(error, UnidentifiedImageError):
        return "not a readable image"
    return one_line(error)


# ---- running the model ---------------------------------------------------------------------------
def resolve_sliding_size(saved_cfg: Config, requested: Optional[int]) -> Optional[int]:
    """Window side for sliding inference, or None for whole-image inference of every size.

    ``requested``: 0 turns sliding off, N > 0 is the window; None takes the checkpoint's
    evaluation window when it evaluates with sliding windows, else ``DEFAULT_SLIDING_SIZE``.
    """
    if requested is not None:
        if requested < 0:
            raise ConfigError(f"--sliding-size must be >= 0, got {requested}")
        return requested or None
    if saved_cfg.eval.mode == "sliding":
        return saved_cfg.eval.crop_size or saved_cfg.data.crop_size
    return DEFAULT_SLIDING_SIZE


class SegmentationPredictor:
    """Softmax probabilities of a trained model for normalised image batches B×3×H×W.

    Whole-image inference pads to a multiple of the output stride as evaluation does; images
    with a side longer than ``sliding_size`` go through count-normalised sliding windows.
    """

    def __init__(self, model: torch.nn.Module, saved_cfg: Config, device: torch.device,
                 sliding_size: Optional[int]):
        self.model = model.eval()
        self.device = device
        self.sliding_size = sliding_size
        self.output_stride = input_stride(saved_cfg)
        self.stride_ratio = saved_cfg.eval.stride_ratio
        self.mean = tuple(saved_cfg.data.mean)
        self.std = tuple(saved_cfg.data.std)

    def to_tensor(self, image: Image.Image) -> torch.Tensor:
        return image_to_tensor(image, self.mean, self.std)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device)
        height, width = images.shape[-2:]
        if self.sliding_size is not None and max(height, width) > self.sliding_size:
            probs, _ = predict(self.model, images, "sliding", crop_size=self.sliding_size,
                               stride_ratio=self.stride_ratio)
        else:
            probs, _ = predict(self.model, images, "whole", output_stride=self.output_stride)
        return probs


def _write_outputs(out_dir: Path, job: ImageJob, image: Image.Image, probs: torch.Tensor,
                   num_classes: int, save_probs: bool) -> None:
    target = out_dir / job.output_stem
    target.parent.mkdir(parents=True, exist_ok=True)
    indices = probs.argmax(dim=0).to(torch.uint8).cpu().numpy()
    save_index_png(target.with_name(target.name + ".png"), indices, num_classes)
    overlay(image, indices, num_classes).save(target.with_name(target.name + "_overlay.png"))
    if save_probs:
        np.save(target.with_name(target.name + "_probs.npy"),
                probs.to(torch.float16).cpu().numpy())


def predict_images(
    checkpoint: PathLike,
    inputs: Sequence[PathLike],
    out_dir: PathLike,
    model_name: str = "teacher",
    save_probs: bool = False,
    sliding_size: Optional[int] = None,
    batch_size: int = 1,
    device: str = "auto",
    progress: bool = True,
    report=None,
) -> PredictSummary:
    """Predict every image of ``inputs`` and write its outputs under ``out_dir``.

    Unreadable inputs are reported through ``report`` (a callable taking one line; by default
    a logged warning) and listed in the returned summary; they never stop the other images.
    A checkpoint that cannot be loaded is a ``CheckpointError`` before anything is written.
    """
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    report = report or logger.warning
    torch_device = resolve_inference_device(device)
    model, saved_cfg, classes = load_trained_model(Path(checkpoint), model_name,
                                                   device=torch_device)
    num_classes = len(classes)
    predictor = SegmentationPredictor(model, saved_cfg, torch_device,
                                      resolve_sliding_size(saved_cfg, sliding_size))

    out_dir = Path(out_dir)
    summary = PredictSummary()
    jobs, summary.failed, summary.renamed = find_images(inputs, exclude=out_dir)
    for path, reason in summary.failed:
        report(f"skipped {path}: {reason}")
    for job, natural_stem in summary.renamed:
        report(f"note: {job.path} is saved as {job.output_stem} ({natural_stem} is taken by "
               f"another input)")
    batches, header_failures = group_by_size(jobs, batch_size)
    for path, reason in header_failures:
        report(f"skipped {path}: {reason}")
    summary.failed.extend(header_failures)
    if not batches:
        return summary

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "legend.txt").write_text(legend(classes) + "\n")
    total = sum(len(batch) for batch in batches)
    with Progress(total, desc="predict", every=max(1, total // 10), enabled=progress) as bar:
        for batch in batches:
            loaded: List[Tuple[ImageJob, Image.Image]] = []
            for job in batch:
                try:
                    loaded.append((job, load_image(job.path)))
                except FarclussError as error:  # its message names the file and the reason
                    summary.failed.append((job.path, str(error)))
                    report(f"skipped: {error}")
                    bar.update(1)
            if not loaded:
                continue
            images = torch.stack([predictor.to_tensor(image) for _, image in loaded])
            probs = predictor(images)
            for (job, image), image_probs in zip(loaded, probs):
                _write_outputs(out_dir, job, image, image_probs, num_classes, save_probs)
                summary.written.append(job)
            bar.update(len(loaded))
    return summary


# ---- command line --------------------------------------------------------------------------------
def cmd_predict(args: argparse.Namespace) -> int:
    summary = predict_images(args.checkpoint, args.inputs, args.out, model_name=args.model,
                             save_probs=args.probs, sliding_size=args.sliding_size,
                             batch_size=args.batch_size, device=args.device)
    print(f"wrote predictions of {len(summary.written)} image(s) to {args.out}")
    if summary.failed:
        logger.error("%d input(s) failed: %s", len(summary.failed),
                     ", ".join(str(path) for path, _ in summary.failed))
        return EXIT_INPUT_FAILED
    return 0


def register_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict", help="segment images with a trained checkpoint",
        description="Segment images or folders of images with a run checkpoint. For each image "
                    "NAME writes NAME.png (class indices as a palette PNG), NAME_overlay.png and, "
                    "with --probs, NAME_probs.npy (C×H×W float16 softmax probabilities).",
        epilog=f"Folders are searched recursively for {' '.join(IMAGE_SUFFIXES)} files and their "
               "sub-folders are kept under --out. An input that cannot be read is named on stderr "
               "and skipped, the other images are still written, and the exit code is "
               f"{EXIT_INPUT_FAILED}; the exit code is 0 when every input was predicted.")
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders")
    add_checkpoint_args(parser)
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--probs", action="store_true", help="also write NAME_probs.npy")
    parser.add_argument("--sliding-size", type=non_negative_int, default=None, metavar="N",
                        help="predict images with a side longer than N in N×N windows (stride "
                             "2/3 of N); 0 = never. Default: the checkpoint's evaluation window "
                             f"when it evaluates with sliding windows, else {DEFAULT_SLIDING_SIZE}")
    parser.add_argument("--batch-size", type=positive_int, default=1, metavar="B",
                        help="images of the same size per forward pass (default 1)")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    parser.set_defaults(func=cmd_predict)
