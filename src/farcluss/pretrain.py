"""`farcluss pretrain`: a backbone that has seen images before, made by the project.

No ImageNet weights exist for the small CPU recipe's encoder (ResNet-18 at base width 32), so
this trains the ResNet encoder on an image *classification* task that is no benchmark's
segmentation task, and writes the encoder's state dict (the parameter names
``models.pretrained.load_pretrained`` strict-loads) plus a sidecar JSON with its sha256.

The task (:class:`PretrainTask`): ``crop``-pixel views, each labelled with one of

- which scikit-image photograph (``PHOTOS``) the view was cut from (random scale, position,
  horizontal flip, colour jitter): colour, texture and object statistics;
- which outline (``SHAPES``: regular 3/4/5/6-gons and a circle, random size, position and
  rotation, a random colour) is painted over a view of a random photograph: edges and shape;
- which glyph (``NUM_GLYPHS`` fixed random stroke figures, :func:`glyph_strokes`: three
  polylines of three points each, like a character of an unknown alphabet) is drawn over a view
  of a random photograph, with per-view jitter of its points, random size, rotation, stroke width
  and colour: objects told apart by shape alone, whatever their colour (recipe version 2; version
  1 had photos and polygons only and did not help a shape-defined dataset, docs/custom_data.md).

Every random draw comes from one ``torch.Generator`` seeded by ``--seed`` (the model's
initialisation from the global torch seed), and by default the run is single-threaded with
deterministic kernels, so one build writes the same file, byte for byte, for a seed.

``model.pretrained: builtin:pretrained`` names the cached file for the configured ResNet and
width (:func:`resolve_pretrained`), made on first use; its recorded sha256 is then checked by
the loader.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from farcluss.cli_args import positive_int
from farcluss.config import DataConfig, ModelConfig
from farcluss.data.benchmark import cache_dir
from farcluss.engine.checkpoint import save_atomic, write_text_atomic
from farcluss.engine.device import configure_backends, resolve_device
from farcluss.engine.distributed import DistEnv
from farcluss.errors import CheckpointError, ConfigError, FarclussError
from farcluss.log import Progress, get_logger
from farcluss.models.deeplab import BACKBONE_DEPTHS
from farcluss.models.pretrained import file_sha256
from farcluss.models.resnet import ResNet, resnet

try:  # optional dependency: the photographs
    import skimage.data as skimage_data
except ImportError:  # pragma: no cover - depends on the environment
    skimage_data = None

logger = get_logger(__name__)

#: ``model.pretrained`` value naming the project's own pretrained encoder
BUILTIN_PRETRAINED = "builtin:pretrained"
#: version of the task and recipe; part of the file name, so a change never reuses an old file
RECIPE_VERSION = 2
#: scikit-image photographs shipped with the package (no download); class k = PHOTOS[k]
PHOTOS = ("astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins",
          "grass", "gravel", "hubble_deep_field", "immunohistochemistry", "moon", "rocket")
#: painted outlines: number of sides of a regular polygon, 0 = a circle
SHAPES = (3, 4, 5, 6, 0)
#: glyph classes; glyph k's strokes are fixed by (GLYPH_SEED, k), not by --seed: the recipe's
#: vocabulary is one, the seed only draws the views
NUM_GLYPHS = 32
GLYPH_SEED = 20261203
DEFAULT_BACKBONE = "resnet18"
DEFAULT_BASE_WIDTH = 32
DEFAULT_ITERATIONS = 3000
DEFAULT_SEED = 0


@dataclass(frozen=True)
class TaskSettings:
    """How the views are made."""

    #: side of the square photo bank (every photograph resized to it)
    photo_size: int = 128
    #: side of a view (the network's input)
    crop: int = 64
    #: a view covers this fraction of the photograph's side (uniform in the range)
    scale_range: Tuple[float, float] = (0.25, 0.6)
    #: brightness, contrast and saturation factors are drawn from 1 ± jitter
    jitter: float = 0.4
    #: horizontal flip probability
    flip_prob: float = 0.5
    #: a glyph's box side as a fraction of the crop (uniform in the range)
    glyph_size: Tuple[float, float] = (0.45, 0.9)
    #: stroke width as a fraction of the glyph's box side
    glyph_stroke: Tuple[float, float] = (0.08, 0.16)
    #: per-view jitter of each stroke point, as a fraction of the box side
    glyph_jitter: float = 0.05
    #: glyph rotation, radians either way
    glyph_rotation: float = 0.35


@dataclass(frozen=True)
class TrainSettings:
    """The optimisation schedule (SGD with momentum, linear warm-up then cosine decay)."""

    iterations: int = DEFAULT_ITERATIONS
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iterations: int = 50
    #: fresh views classified in eval mode after training (the held-out accuracy)
    heldout_samples: int = 512


def class_names() -> Tuple[str, ...]:
    return (tuple(f"photo:{name}" for name in PHOTOS)
            + tuple("shape:circle" if sides == 0 else f"shape:{sides}-gon" for sides in SHAPES)
            + tuple(f"glyph:{k}" for k in range(NUM_GLYPHS)))


def glyph_strokes(num_glyphs: int = NUM_GLYPHS, seed: int = GLYPH_SEED) -> torch.Tensor:
    """``G×3×3×2``: glyph g's three polylines of three (x, y) points in the unit box
    [0.1, 0.9]², drawn from ``(seed, g)`` alone."""
    glyphs = []
    for glyph in range(num_glyphs):
        generator = torch.Generator().manual_seed(seed * 1000 + glyph)
        glyphs.append(0.1 + 0.8 * torch.rand(3, 3, 2, generator=generator))
    return torch.stack(glyphs)


def stroke_masks(points: torch.Tensor, width: torch.Tensor, size: int) -> torch.Tensor:
    """``B×size×size`` bool masks: the pixels within ``width / 2`` of a polyline segment.

    ``points`` is ``B×L×P×2`` (x, y pixel coordinates of L polylines of P points each), ``width``
    is ``B``. A pixel centre p is covered when min over segments ab of
    ``|p − (a + t (b − a))|``, ``t = clamp((p − a)·(b − a) / |b − a|², 0, 1)``, is ≤ width / 2.
    """
    n = points.shape[0]
    start = points[:, :, :-1].reshape(n, -1, 1, 1, 2)
    end = points[:, :, 1:].reshape(n, -1, 1, 1, 2)
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    pixel = torch.stack(torch.meshgrid(coords, coords, indexing="xy"), dim=-1)[None, None]
    direction = end - start
    length2 = (direction * direction).sum(-1).clamp(min=1e-6)
    t = (((pixel - start) * direction).sum(-1) / length2).clamp(0, 1)
    nearest = start + t[..., None] * direction
    distance = (pixel - nearest).square().sum(-1).sqrt().amin(dim=1)
    return distance <= width[:, None, None] / 2


def _photo(name: str) -> np.ndarray:
    image = np.asarray(getattr(skimage_data, name)())
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return image[..., :3].astype(np.float32) / 255.0


def load_photo_bank(size: int) -> torch.Tensor:
    """The photographs as ``P×3×size×size`` floats in [0, 1] (resized with antialiasing)."""
    if skimage_data is None:
        raise FarclussError("farcluss pretrain needs scikit-image for its photographs: "
                            "pip install scikit-image (or farcluss[pretrain])")
    bank = []
    for name in PHOTOS:
        image = torch.from_numpy(_photo(name)).permute(2, 0, 1)[None]
        bank.append(F.interpolate(image, size=(size, size), mode="bilinear",
                                  align_corners=False, antialias=True)[0])
    return torch.stack(bank).clamp_(0, 1)


def polygon_masks(sides: torch.Tensor, radius: torch.Tensor, angle: torch.Tensor,
                  centre: torch.Tensor, size: int) -> torch.Tensor:
    """``B×size×size`` bool masks of regular polygons (``sides`` 0 = a circle) of circumradius
    ``radius`` pixels, rotated by ``angle`` radians, centred at ``centre`` (``B×2``, x, y)."""
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    dx = coords[None, None, :] - centre[:, 0, None, None]
    dy = coords[None, :, None] - centre[:, 1, None, None]
    distance = torch.sqrt(dx * dx + dy * dy)
    theta = torch.atan2(dy, dx) - angle[:, None, None]
    k = sides.clamp(min=3).to(torch.float32)[:, None, None]
    sector = 2 * math.pi / k
    # distance from the centre to the polygon's edge in direction theta
    local = torch.remainder(theta, sector) - sector / 2
    edge = radius[:, None, None] * torch.cos(sector / 2) / torch.cos(local)
    edge = torch.where(sides[:, None, None] == 0, radius[:, None, None].expand_as(edge), edge)
    return distance <= edge


class PretrainTask:
    """Labelled views for the classification task; class ``k < len(PHOTOS)`` is photograph k."""

    def __init__(self, settings: TaskSettings = TaskSettings(),
                 mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None):
        """`mean`/`std`: the normalisation; None → ``data.mean``/``data.std``'s defaults."""
        self.settings = settings
        self.photos = load_photo_bank(settings.photo_size)
        self.glyphs = glyph_strokes()
        self.names = class_names()
        self.num_classes = len(self.names)
        mean = DataConfig().mean if mean is None else mean
        std = DataConfig().std if std is None else std
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def _uniform(self, n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=generator)

    def photo_views(self, photo: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Views (``B×3×crop×crop`` in [0, 1], no jitter) of the photographs ``photo`` (indices)."""
        s = self.settings
        n = photo.numel()
        scale = self._uniform(n, *s.scale_range, generator)
        shift_x = (2 * torch.rand(n, generator=generator) - 1) * (1 - scale)
        shift_y = (2 * torch.rand(n, generator=generator) - 1) * (1 - scale)
        flip = torch.where(torch.rand(n, generator=generator) < s.flip_prob, -1.0, 1.0)
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0] = scale * flip
        theta[:, 0, 2] = shift_x
        theta[:, 1, 1] = scale
        theta[:, 1, 2] = shift_y
        grid = F.affine_grid(theta, [n, 3, s.crop, s.crop], align_corners=False)
        return F.grid_sample(self.photos[photo], grid, mode="bilinear", padding_mode="border",
                             align_corners=False)

    def _jitter(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        j = self.settings.jitter
        if j <= 0:
            return images
        n = images.shape[0]
        brightness = self._uniform(n, 1 - j, 1 + j, generator).view(n, 1, 1, 1)
        contrast = self._uniform(n, 1 - j, 1 + j, generator).view(n, 1, 1, 1)
        saturation = self._uniform(n, 1 - j, 1 + j, generator).view(n, 1, 1, 1)
        images = images * brightness
        mean = images.mean(dim=(1, 2, 3), keepdim=True)
        images = (images - mean) * contrast + mean
        grey = images.mean(dim=1, keepdim=True)
        images = (images - grey) * saturation + grey
        return images.clamp(0, 1)

    def _glyph_masks(self, glyph: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``n×crop×crop`` masks of glyph ``glyph[i]`` (rows with ``glyph < 0`` stay empty),
        each with its own jitter, size, rotation, position and stroke width."""
        s = self.settings
        n, crop = glyph.numel(), s.crop
        points = self.glyphs[glyph.clamp(min=0)]  # n×3×3×2 in the unit box
        points = points + s.glyph_jitter * (2 * torch.rand(points.shape, generator=generator) - 1)
        side = self._uniform(n, *s.glyph_size, generator) * crop
        angle = (2 * torch.rand(n, generator=generator) - 1) * s.glyph_rotation
        cos, sin = torch.cos(angle), torch.sin(angle)
        rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
        margin = (crop - side) / 2
        centre = crop / 2 + (2 * torch.rand(n, 2, generator=generator) - 1) * margin[:, None]
        offsets = torch.einsum("nij,nlpj->nlpi", rotation, points - 0.5)
        pixels = centre[:, None, None] + side[:, None, None, None] * offsets
        width = self._uniform(n, *s.glyph_stroke, generator) * side
        masks = torch.zeros(n, crop, crop, dtype=torch.bool)
        rows = (glyph >= 0).nonzero().flatten()  # the distance maps cost: only where drawn
        if rows.numel():
            masks[rows] = stroke_masks(pixels[rows], width[rows], crop)
        return masks

    def sample(self, n: int, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        """``n`` normalised views (``n×3×crop×crop``) and their labels (int64)."""
        crop = self.settings.crop
        num_photos = len(PHOTOS)
        labels = torch.randint(self.num_classes, (n,), generator=generator)
        is_shape = labels >= num_photos
        background = torch.randint(num_photos, (n,), generator=generator)
        photo = torch.where(is_shape, background, labels)
        images = self.photo_views(photo, generator)

        sides = torch.tensor(SHAPES)[(labels - num_photos).clamp(0, len(SHAPES) - 1)]
        radius = self._uniform(n, 0.25 * crop, 0.45 * crop, generator)
        margin = (crop / 2 - radius).clamp(min=0)
        centre = torch.stack([crop / 2 + (2 * torch.rand(n, generator=generator) - 1) * margin,
                              crop / 2 + (2 * torch.rand(n, generator=generator) - 1) * margin], 1)
        angle = torch.rand(n, generator=generator) * 2 * math.pi
        colour = torch.rand(n, 3, generator=generator)
        is_polygon = is_shape & (labels < num_photos + len(SHAPES))
        mask = polygon_masks(sides, radius, angle, centre, crop) & is_polygon[:, None, None]
        mask |= self._glyph_masks(labels - num_photos - len(SHAPES), generator)
        images = torch.where(mask[:, None], colour[:, :, None, None], images)

        images = self._jitter(images, generator)
        return (images - self.mean) / self.std, labels


class Classifier(nn.Module):
    """The ResNet encoder, global average pooling and a linear layer."""

    def __init__(self, backbone: ResNet, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.fc = nn.Linear(backbone.out_channels[-1], num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(self.backbone(images)[-1].mean(dim=(2, 3)))


def default_pretrained_path(backbone: str = DEFAULT_BACKBONE, base_width: int = DEFAULT_BASE_WIDTH,
                            seed: int = DEFAULT_SEED,
                            iterations: int = DEFAULT_ITERATIONS) -> Path:
    """``<cache>/pretrained-<backbone>-w<width>-v<version>-seed<seed>.pt``, with ``-it<N>``
    before ``.pt`` for a schedule other than the default; the cache folder is the built-in
    benchmark's (``$FARCLUSS_CACHE``, else ``~/.cache/farcluss``)."""
    cache = cache_dir()
    schedule = "" if iterations == DEFAULT_ITERATIONS else f"-it{iterations}"
    return cache / f"pretrained-{backbone}-w{base_width}-v{RECIPE_VERSION}-seed{seed}{schedule}.pt"


def builtin_iterations(value: Optional[str]) -> Optional[int]:
    """The pretraining schedule a ``model.pretrained`` value names: ``builtin:pretrained`` →
    the default, ``builtin:pretrained@N`` → N iterations; None for any other value."""
    if value is None or not value.startswith(BUILTIN_PRETRAINED):
        return None
    rest = value[len(BUILTIN_PRETRAINED):]
    if rest == "":
        return DEFAULT_ITERATIONS
    if rest.startswith("@") and rest[1:].isdigit() and int(rest[1:]) > 0:
        return int(rest[1:])
    raise ConfigError(f"config key 'model.pretrained': {value!r} is not {BUILTIN_PRETRAINED} "
                      f"or {BUILTIN_PRETRAINED}@N (N pretraining iterations, e.g. @9000)")


def sidecar_path(path: Path) -> Path:
    return Path(path).with_suffix(".json")


def _lr_at(step: int, train: TrainSettings) -> float:
    if step < train.warmup_iterations:
        return train.lr * (step + 1) / train.warmup_iterations
    span = max(1, train.iterations - train.warmup_iterations)
    return 0.5 * train.lr * (1 + math.cos(math.pi * (step - train.warmup_iterations) / span))


def pretrain(out: Optional[Path] = None, backbone: str = DEFAULT_BACKBONE,
             base_width: int = DEFAULT_BASE_WIDTH, seed: int = DEFAULT_SEED, threads: int = 1,
             device: str = "cpu", train: TrainSettings = TrainSettings(),
             task_settings: TaskSettings = TaskSettings(), log_every: int = 50) -> dict:
    """Train the encoder on :class:`PretrainTask`; write its state dict to ``out`` and the
    sidecar JSON beside it (both atomically). Returns the sidecar's content."""
    if backbone not in BACKBONE_DEPTHS:
        raise ConfigError(f"--backbone: {backbone!r} is not a ResNet; choose one of "
                          f"{', '.join(BACKBONE_DEPTHS)}")
    out = Path(out) if out is not None else default_pretrained_path(backbone, base_width, seed)
    start = time.perf_counter()
    # made on a trainer's first use: leave its threads, global RNG and backend flags as they were
    previous = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):
            return _pretrain(out, backbone, base_width, seed, threads, device, train,
                             task_settings, log_every, start)
    finally:
        torch.set_num_threads(previous[0])
        torch.use_deterministic_algorithms(previous[1], warn_only=previous[2])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = previous[3:]


def _pretrain(out: Path, backbone: str, base_width: int, seed: int, threads: int, device: str,
              train: TrainSettings, task_settings: TaskSettings, log_every: int,
              start: float) -> dict:
    torch_device = resolve_device(device, DistEnv())
    configure_backends(torch_device, deterministic=True)
    task = PretrainTask(task_settings)
    torch.manual_seed(seed)  # the model's initialisation
    generator = torch.Generator().manual_seed(seed)  # every view
    model = Classifier(resnet(BACKBONE_DEPTHS[backbone], output_stride=32,
                              base_width=base_width), task.num_classes).to(torch_device)
    optimizer = torch.optim.SGD(model.parameters(), lr=train.lr, momentum=train.momentum,
                                weight_decay=train.weight_decay, nesterov=True)
    tail = max(1, train.iterations // 10)  # the training accuracy is over the last 10 %
    correct = seen = 0
    model.train()
    with Progress(train.iterations, desc="pretrain", every=log_every) as progress:
        for step in range(train.iterations):
            images, labels = task.sample(train.batch_size, generator)
            images, labels = images.to(torch_device), labels.to(torch_device)
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, train)
            logits = model(images)
            loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            hits = int((logits.argmax(1) == labels).sum())
            if step >= train.iterations - tail:
                correct, seen = correct + hits, seen + labels.numel()
            progress.update(1, postfix={"loss": float(loss.detach()),
                                        "acc": hits / labels.numel(),
                                        "lr": optimizer.param_groups[0]["lr"]})
    model.eval()
    heldout_hits = 0
    with torch.no_grad():
        for first in range(0, train.heldout_samples, 256):
            n = min(256, train.heldout_samples - first)
            images, labels = task.sample(n, generator)
            logits = model(images.to(torch_device))
            heldout_hits += int((logits.argmax(1).cpu() == labels).sum())
    state = {key: value.detach().cpu().contiguous()
             for key, value in model.backbone.state_dict().items()}
    save_atomic(state, out)
    record = {
        "file": out.name,
        "sha256": file_sha256(str(out)),
        "backbone": backbone,
        "base_width": base_width,
        "recipe_version": RECIPE_VERSION,
        "seed": seed,
        "threads": threads,
        "device": str(torch_device),
        "torch_version": torch.__version__,
        "train": asdict(train),
        "task": asdict(task_settings),
        "classes": list(task.names),
        "train_accuracy": 100.0 * correct / max(1, seen),
        "heldout_accuracy": 100.0 * heldout_hits / max(1, train.heldout_samples),
        "seconds": round(time.perf_counter() - start, 1),
    }
    write_text_atomic(sidecar_path(out), json.dumps(record, indent=2) + "\n")
    logger.info("pretrained %s (width %d) in %.0f s: train accuracy %.1f %%, held-out %.1f %%; "
                "wrote %s", backbone, base_width, record["seconds"], record["train_accuracy"],
                record["heldout_accuracy"], out)
    return record


def read_sidecar(path: Path) -> Optional[dict]:
    """The sidecar of a pretrained file, or None when it does not exist (not made yet)."""
    side = sidecar_path(path)
    if not side.is_file():
        return None
    try:
        record = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{side}: unreadable sidecar ({error}); delete it and "
                              f"{Path(path).name} to make them again") from None
    if not isinstance(record, dict) or not isinstance(record.get("sha256"), str):
        raise CheckpointError(f"{side}: no sha256 recorded; delete it and {Path(path).name} "
                              f"to make them again")
    return record


def resolve_pretrained(model: ModelConfig, device: str = "cpu"
                       ) -> Tuple[Optional[str], Optional[str]]:
    """``model.pretrained`` and ``model.pretrained_sha256`` as the loader takes them.

    ``builtin:pretrained`` (``@N``: N iterations instead of the default) becomes the cached file
    of :func:`pretrain` for the configured ResNet and base width (made on first use, with a log
    line) and its recorded sha256, unless ``model.pretrained_sha256`` pins another. Any other
    value passes through unchanged.
    """
    iterations = builtin_iterations(model.pretrained)
    if iterations is None:
        return model.pretrained, model.pretrained_sha256
    if model.backbone not in BACKBONE_DEPTHS or model.deep_stem:
        raise ConfigError(f"config key 'model.pretrained' is {BUILTIN_PRETRAINED}, which is made "
                          f"for a ResNet with the 7x7 stem; the model is {model.backbone}"
                          + (" with a deep stem" if model.deep_stem else ""))
    if model.stem_width not in (None, model.base_width):
        raise ConfigError(f"config key 'model.pretrained' is {BUILTIN_PRETRAINED}, whose stem "
                          f"width is the base width; unset model.stem_width")
    path = default_pretrained_path(model.backbone, model.base_width, iterations=iterations)
    record = read_sidecar(path) if path.is_file() else None
    if record is None:
        logger.info("making the built-in pretrained %s (width %d) in %s (once; %d iterations)",
                    model.backbone, model.base_width, path, iterations)
        record = pretrain(path, backbone=model.backbone, base_width=model.base_width,
                          device=device, train=replace(TrainSettings(), iterations=iterations))
    return str(path), model.pretrained_sha256 or record["sha256"]


# ---- command ------------------------------------------------------------------------------------
def cmd_pretrain(args: argparse.Namespace) -> int:
    train = TrainSettings(iterations=args.iterations)
    if args.batch_size is not None:
        train = replace(train, batch_size=args.batch_size)
    out = Path(args.out) if args.out else default_pretrained_path(
        args.backbone, args.base_width, args.seed, args.iterations)
    record = pretrain(out, backbone=args.backbone, base_width=args.base_width, seed=args.seed,
                      threads=args.threads, device=args.device, train=train)
    print(f"train accuracy {record['train_accuracy']:.1f} %  held-out accuracy "
          f"{record['heldout_accuracy']:.1f} %  ({record['seconds']:.0f} s)")
    print(f"wrote {out} (sha256 {record['sha256']}) and {sidecar_path(out)}")
    return 0


def register_command(subparsers) -> None:
    p = subparsers.add_parser("pretrain", help="pretrain a ResNet encoder on a photo/shape "
                                               "classification task (builtin:pretrained)")
    p.add_argument("--out", default=None,
                   help="weights file (default <cache>/pretrained-<backbone>-w<width>-v"
                        f"{RECIPE_VERSION}-seed<seed>[-it<N>].pt, what builtin:pretrained[@N] "
                        "reads for seed 0)")
    p.add_argument("--iterations", type=positive_int, default=DEFAULT_ITERATIONS,
                   help=f"training iterations (default {DEFAULT_ITERATIONS})")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the initialisation "
                                                                  "and of every view")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="CPU threads (default 1: the same file on every run of one build)")
    p.add_argument("--backbone", choices=list(BACKBONE_DEPTHS), default=DEFAULT_BACKBONE)
    p.add_argument("--base-width", type=positive_int, default=DEFAULT_BASE_WIDTH,
                   help=f"channels of the first stage (default {DEFAULT_BASE_WIDTH})")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help=f"views per iteration (default {TrainSettings.batch_size})")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    p.set_defaults(func=cmd_pretrain)
