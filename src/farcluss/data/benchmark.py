"""The built-in benchmark: a procedural, long-tailed segmentation dataset generated from a seed.

The dataset is written to disk in the generic folder layout, so training on it exercises the same
loading code as user data::

    OUT/
      images/00000.png ...      RGB
      masks/00000.png ...       mode 'L', class indices 0..C-1 (background = 0)
      classes.txt               one class name per line, background first
      splits/labeled.txt  splits/unlabeled.txt  splits/val.txt  splits/train_full.txt
      splits/test.txt           held-back test images, numbered after the val images
      splits/labeled_half.txt  splits/unlabeled_half.txt
                                half of labeled.txt (1/32 of train at the default 1/16) and
                                the rest of train: the benchmark's label budget (docs/method.md)
      benchmark.json            generator version, parameters, counts, class frequencies

Design. The training pipeline's strong view applies colour jitter (hue up to 0.25), grayscale and
blur, and a strong view must not change what an object is. So a class is defined by its *shape*
and its *luminance texture* (stripe orientation, checker, dots, smooth), never by its colour:
object classes share colour palettes in pairs, and the background draws its colours from every
palette and carries its own clutter (lines, blotches, irregular blobs with wavy or speckled
textures). Neither cue alone decides: the background holds decoys (a class's shape with another
class's texture), and two rare classes have a near-twin texture in a common class, so their
pixels stay ambiguous until the shape is seen.
Nuisances: overlapping objects (occlusion), objects cut by the border, illumination gradients,
blur and sensor noise. Class frequency is long-tailed through how often a class is drawn and how
large it is, never by making it hard to see: the rarest object class covers about 20x fewer
pixels than the most common one.

Every image is rendered from its own random stream, derived from ``(seed, split, index)``, so
train image ``i`` is the same whatever ``num_train`` is, and two runs with one seed write
byte-identical files. The test split has its own stream too: adding it (generator version 2)
left every train and val image, mask and split list of version 1 unchanged.
"""

from __future__ import annotations

import colorsys
import json
import math
import os
import secrets
import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from farcluss.errors import ConfigError, DataError
from farcluss.log import Progress

# Bump whenever the rendered pixels, the split selection or the file layout change: a cached
# benchmark written by another version is then regenerated instead of silently reused.
# 2: the held-back test split (splits/test.txt); 3: the nested half-size labeled split
# (splits/labeled_half.txt, unlabeled_half.txt), every other file as version 2 wrote it.
GENERATOR_VERSION = 3

SPLIT_FILES = ("labeled.txt", "unlabeled.txt", "val.txt", "train_full.txt", "test.txt",
               "labeled_half.txt", "unlabeled_half.txt")
METADATA_FILE = "benchmark.json"

# Separate random streams for the three splits and for the labeled-subset draw.
_TRAIN_STREAM, _VAL_STREAM, _SPLIT_STREAM, _TEST_STREAM = 0, 1, 2, 3


# --------------------------------------------------------------------------------------------
# Shapes: boolean functions of object-centred coordinates (u, v), rotated and divided by the
# object's radius, so the shape's extent is about the unit disc. `aspect` is drawn per object.
# --------------------------------------------------------------------------------------------

ShapeFn = Callable[[np.ndarray, np.ndarray, float], np.ndarray]


def _ellipse(u: np.ndarray, v: np.ndarray, aspect: float) -> np.ndarray:
    return u**2 + (v / aspect) ** 2 <= 1.0


def _rectangle(u: np.ndarray, v: np.ndarray, aspect: float) -> np.ndarray:
    return (np.abs(u) <= 1.0) & (np.abs(v) <= aspect)


def _diamond(u: np.ndarray, v: np.ndarray, aspect: float) -> np.ndarray:
    return np.abs(u) + np.abs(v) / aspect <= 1.0


def _ring(u: np.ndarray, v: np.ndarray, aspect: float) -> np.ndarray:
    # `aspect` is the inner radius; a thickness of half the radius stays >= 4 px on small rings.
    radius_sq = u**2 + v**2
    return (radius_sq <= 1.0) & (radius_sq >= aspect**2)


def _star(u: np.ndarray, v: np.ndarray, aspect: float) -> np.ndarray:
    # Five rounded points: the boundary radius oscillates between 1 - 2*aspect and 1.
    radius = np.sqrt(u**2 + v**2)
    angle = np.arctan2(v, u)
    return radius <= (1.0 - aspect) + aspect * np.cos(5.0 * angle)


def _triangle(u: np.ndarray, v: np.ndarray, aspect: float) -> np.ndarray:
    # Equilateral triangle with circumradius 1: inside the three half-planes whose outward normals
    # point away from the vertices at 90, 210 and 330 degrees (inradius 0.5).
    inside = np.ones(np.broadcast(u, v).shape, dtype=bool)
    for normal_deg in (-90.0, 30.0, 150.0):
        normal = math.radians(normal_deg)
        inside &= u * math.cos(normal) + v * math.sin(normal) <= 0.5
    return inside


def _cross(u: np.ndarray, v: np.ndarray, aspect: float) -> np.ndarray:
    abs_u, abs_v = np.abs(u), np.abs(v)
    return ((abs_u <= 1.0) & (abs_v <= aspect)) | ((abs_u <= aspect) & (abs_v <= 1.0))


def _crescent(u: np.ndarray, v: np.ndarray, aspect: float) -> np.ndarray:
    # Unit disc minus a disc of radius 0.8 shifted by `aspect` along u.
    return (u**2 + v**2 <= 1.0) & ((u - aspect) ** 2 + v**2 > 0.64)


# name -> (function, range of the per-object aspect parameter)
_SHAPES: Dict[str, Tuple[ShapeFn, Tuple[float, float]]] = {
    "ellipse": (_ellipse, (0.7, 1.0)),
    "rectangle": (_rectangle, (0.45, 0.7)),
    "diamond": (_diamond, (0.55, 0.75)),
    "ring": (_ring, (0.45, 0.55)),
    "star": (_star, (0.32, 0.4)),
    "triangle": (_triangle, (1.0, 1.0)),
    "cross": (_cross, (0.3, 0.4)),
    "crescent": (_crescent, (0.5, 0.65)),
}


@lru_cache(maxsize=None)
def _unit_area(shape: str) -> float:
    """Area of a shape of radius 1 at its mid aspect, so objects can be sized by pixel area."""
    shape_fn, (low, high) = _SHAPES[shape]
    grid = np.linspace(-1.0, 1.0, 401)
    inside = shape_fn(grid[None, :], grid[:, None], 0.5 * (low + high))
    return float(inside.mean()) * 4.0


# --------------------------------------------------------------------------------------------
# Textures: luminance patterns t in [0, 1] over image coordinates (so "horizontal" stays
# horizontal whatever the object's rotation); a pixel's colour is dark + (light - dark) * t.
# Periods of 6-12 px are within reach of a small CNN at 64-96 px and survive mild blur.
# --------------------------------------------------------------------------------------------

TextureFn = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.random.Generator], np.ndarray]


def _soft_square(wave: np.ndarray) -> np.ndarray:
    """Map a sinusoid in [-1, 1] to a square wave in [0, 1] with one-pixel-soft edges."""
    return 0.5 + 0.5 * np.tanh(3.0 * wave)


def _jitter_angle(rng: np.random.Generator, degrees: float = 8.0) -> float:
    return math.radians(float(np.clip(rng.normal(0.0, degrees), -2 * degrees, 2 * degrees)))


def _stripes(ys, xs, rng, base_deg: float, period: Tuple[float, float]) -> np.ndarray:
    angle = math.radians(base_deg) + _jitter_angle(rng)
    wavelength = rng.uniform(*period)
    # Intensity varies along the direction `angle` (measured from the x axis, y pointing down).
    along = xs * math.cos(angle) + ys * math.sin(angle)
    return _soft_square(np.sin(2 * math.pi * along / wavelength + rng.uniform(0, 2 * math.pi)))


def _horizontal_stripes(ys, xs, dy, dx, rng):
    return _stripes(ys, xs, rng, 90.0, (6.0, 9.0))


def _horizontal_lines(ys, xs, dy, dx, rng):
    # Thin dark lines on a light ground: horizontal stripes with a 1:2 duty cycle, which blur
    # makes hard to tell from the even stripes.
    angle = math.radians(90.0) + _jitter_angle(rng)
    wavelength = rng.uniform(6.0, 9.0)
    along = xs * math.cos(angle) + ys * math.sin(angle)
    return _soft_square(np.sin(2 * math.pi * along / wavelength + rng.uniform(0, 2 * math.pi)) + 0.5)


def _vertical_stripes(ys, xs, dy, dx, rng):
    return _stripes(ys, xs, rng, 0.0, (6.0, 9.0))


def _diagonal_stripes(ys, xs, dy, dx, rng):
    # One diagonal only: a horizontal flip turns 45 degrees into 135, so a second diagonal class
    # would be indistinguishable under the weak augmentation.
    return _stripes(ys, xs, rng, 45.0, (6.0, 9.0))


def _checker_at(ys, xs, rng, base_deg: float) -> np.ndarray:
    angle = math.radians(base_deg) + _jitter_angle(rng)
    cell = rng.uniform(8.0, 12.0)  # a full period: squares of 4-6 px
    along_x = xs * math.cos(angle) + ys * math.sin(angle)
    along_y = ys * math.cos(angle) - xs * math.sin(angle)
    wave_x = np.sin(2 * math.pi * along_x / cell + rng.uniform(0, 2 * math.pi))
    wave_y = np.sin(2 * math.pi * along_y / cell + rng.uniform(0, 2 * math.pi))
    return 0.5 + 0.5 * np.tanh(3.0 * wave_x) * np.tanh(3.0 * wave_y)


def _checker(ys, xs, dy, dx, rng):
    return _checker_at(ys, xs, rng, 0.0)


def _diagonal_checker(ys, xs, dy, dx, rng):
    # The same checker turned by 45 degrees (symmetric under a horizontal flip).
    return _checker_at(ys, xs, rng, 45.0)


def _dots(ys, xs, dy, dx, rng):
    # Dark round dots on a light ground: the sum of two cosines peaks on a square lattice.
    spacing = rng.uniform(6.0, 9.0)
    lattice = np.cos(2 * math.pi * xs / spacing + rng.uniform(0, 2 * math.pi)) + np.cos(
        2 * math.pi * ys / spacing + rng.uniform(0, 2 * math.pi)
    )
    return 1.0 - 0.5 * (1.0 + np.tanh(3.0 * (lattice - 0.9)))


def _smooth(ys, xs, dy, dx, rng):
    # Untextured but not flat: a soft shading across the object, like a lit curved surface.
    direction = rng.uniform(0, 2 * math.pi)
    shading = dx * math.cos(direction) + dy * math.sin(direction)
    return np.clip(0.75 + 0.25 * shading, 0.0, 1.0)


def _waves(ys, xs, dy, dx, rng):
    """Background clutter: curved stripes, locally stripe-like but never straight."""
    wavelength = rng.uniform(5.0, 9.0)
    bend_length = rng.uniform(12.0, 24.0)
    bend = rng.uniform(2.0, 4.0) * np.sin(2 * math.pi * xs / bend_length + rng.uniform(0, 6.3))
    if rng.random() < 0.5:
        ys, xs = xs, ys
    return _soft_square(np.sin(2 * math.pi * (ys + bend) / wavelength + rng.uniform(0, 6.3)))


def _speckle(ys, xs, dy, dx, rng):
    """Background clutter: blocky random noise with no period."""
    block = int(rng.integers(2, 4))
    height, width = np.broadcast(ys, xs).shape
    coarse = rng.random((height // block + 1, width // block + 1))
    return np.repeat(np.repeat(coarse, block, axis=0), block, axis=1)[:height, :width]


_TEXTURES: Dict[str, TextureFn] = {
    "horizontal_stripes": _horizontal_stripes,
    "vertical_stripes": _vertical_stripes,
    "diagonal_stripes": _diagonal_stripes,
    "checker": _checker,
    "diagonal_checker": _diagonal_checker,
    "horizontal_lines": _horizontal_lines,
    "dots": _dots,
    "smooth": _smooth,
    "waves": _waves,
    "speckle": _speckle,
}

# Colour palettes: (hue centre in degrees, hue half-width). Saturation and value are drawn from
# shared ranges, so palettes differ only in hue, which the strong view's hue jitter scrambles.
_PALETTES: Dict[str, Tuple[float, float]] = {
    "warm": (20.0, 22.0),
    "cool": (215.0, 25.0),
    "green": (115.0, 25.0),
    "magenta": (300.0, 25.0),
}


@dataclass(frozen=True)
class _ObjectClass:
    name: str
    shape: str
    texture: str
    palette: str
    occurrence: float  # relative probability that a drawn object belongs to this class
    area_scale: float  # relative pixel area of an instance


# Ordered from most to least frequent. Colour palettes are shared in pairs. Two rare classes
# have a near-twin texture in a common class (moon's thin lines vs ball's stripes, triangle's
# diagonal checker vs brick's checker): under blur or at a small scale only the shape tells them
# apart, so their pixels are ambiguous until the model has seen enough of them.
_OBJECT_CLASSES: Tuple[_ObjectClass, ...] = (
    _ObjectClass("ball", "ellipse", "horizontal_stripes", "warm", 0.27, 1.00),
    _ObjectClass("brick", "rectangle", "checker", "cool", 0.21, 0.95),
    _ObjectClass("kite", "diamond", "vertical_stripes", "green", 0.16, 0.85),
    _ObjectClass("ring", "ring", "smooth", "warm", 0.12, 0.80),
    _ObjectClass("star", "star", "dots", "cool", 0.09, 0.70),
    _ObjectClass("triangle", "triangle", "diagonal_checker", "green", 0.065, 0.65),
    _ObjectClass("cross", "cross", "diagonal_stripes", "magenta", 0.045, 0.60),
    _ObjectClass("moon", "crescent", "horizontal_lines", "magenta", 0.028, 0.50),
)

BENCHMARK_CLASSES: List[str] = ["background"] + [spec.name for spec in _OBJECT_CLASSES]

# Decoys are background: a class's shape with another class's texture, so neither cue alone
# decides the class. Near-twin textures are excluded (a striped crescent would be a moon in all
# but name), which keeps every labelled pixel decidable from shape plus texture.
_TWIN_TEXTURES = ({"horizontal_stripes", "horizontal_lines"}, {"checker", "diagonal_checker"})


def _texture_family(texture: str) -> set:
    return next((family for family in _TWIN_TEXTURES if texture in family), {texture})


_DECOYS: Tuple[Tuple[str, str], ...] = tuple(
    (spec.shape, other.texture)
    for spec in _OBJECT_CLASSES
    for other in _OBJECT_CLASSES
    if other.texture not in _texture_family(spec.texture)
)
_DECOY_AREA_SCALE = 0.8

_OCCURRENCE = np.array([spec.occurrence for spec in _OBJECT_CLASSES])
_OCCURRENCE = _OCCURRENCE / _OCCURRENCE.sum()


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _hsv_to_rgb(hue_deg: float, saturation: float, value: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb((hue_deg / 360.0) % 1.0, saturation, value), np.float32)


def _object_colour(rng: np.random.Generator, palette: str) -> np.ndarray:
    centre, half_width = _PALETTES[palette]
    hue = centre + rng.uniform(-half_width, half_width)
    return _hsv_to_rgb(hue, rng.uniform(0.4, 0.95), rng.uniform(0.6, 1.0))


def _background_colour(rng: np.random.Generator) -> np.ndarray:
    # Any palette (or grey): background colour alone must never give the class away.
    if rng.random() < 0.2:
        grey = rng.uniform(0.25, 0.85)
        return np.full(3, grey, np.float32)
    palette = list(_PALETTES)[int(rng.integers(len(_PALETTES)))]
    centre, half_width = _PALETTES[palette]
    hue = centre + rng.uniform(-half_width, half_width)
    return _hsv_to_rgb(hue, rng.uniform(0.15, 0.8), rng.uniform(0.3, 0.9))


def _smooth_field(rng: np.random.Generator, grid: int, size: Tuple[int, int]) -> np.ndarray:
    """A low-frequency random field in [0, 1] (H x W x 1): grid x grid values, bilinearly upsampled."""
    height, width = size
    coarse = Image.fromarray(np.round(rng.random((grid, grid)) * 255).astype(np.uint8))
    return np.asarray(coarse.resize((width, height), Image.BILINEAR), np.float32)[..., None] / 255.0


def _render_background(rng: np.random.Generator, size: Tuple[int, int]) -> np.ndarray:
    height, width = size
    # A few colours blended smoothly over the frame, then blotchy brightness variation.
    grid = int(rng.integers(2, 4))
    colours = np.stack([_background_colour(rng) for _ in range(grid * grid)]).reshape(grid, grid, 3)
    base = Image.fromarray(np.round(colours * 255).astype(np.uint8)).resize((width, height), Image.BILINEAR)
    blotches = _smooth_field(rng, int(rng.integers(5, 10)), size)
    background = np.asarray(base, np.float32) / 255.0 * (0.7 + 0.6 * blotches)

    # Thin clutter lines: locally they look like a stripe or an edge.
    line_count = int(rng.integers(0, 6))
    if line_count:
        canvas = Image.fromarray(np.round(np.clip(background, 0, 1) * 255).astype(np.uint8))
        draw = ImageDraw.Draw(canvas)
        for _ in range(line_count):
            start = (float(rng.uniform(0, width)), float(rng.uniform(0, height)))
            end = (float(rng.uniform(0, width)), float(rng.uniform(0, height)))
            colour = tuple(int(c) for c in np.round(_background_colour(rng) * 255))
            draw.line([start, end], fill=colour, width=int(rng.integers(1, 3)))
        background = np.asarray(canvas, np.float32) / 255.0
    return background


def _paint(
    image: np.ndarray,
    mask: np.ndarray,
    rng: np.random.Generator,
    label: int,
    shape_fn: ShapeFn,
    aspect: float,
    texture: str,
    radius: float,
    centre: Tuple[float, float],
    light: np.ndarray,
) -> None:
    """Paint one textured shape over `image` and write `label` into `mask` where it lands."""
    height, width = mask.shape
    centre_y, centre_x = centre
    top, bottom = max(0, int(centre_y - radius) - 1), min(height, int(centre_y + radius) + 2)
    left, right = max(0, int(centre_x - radius) - 1), min(width, int(centre_x + radius) + 2)
    if top >= bottom or left >= right:
        return
    ys = np.arange(top, bottom, dtype=np.float32)[:, None]
    xs = np.arange(left, right, dtype=np.float32)[None, :]
    dy, dx = (ys - centre_y) / radius, (xs - centre_x) / radius
    rotation = rng.uniform(0, 2 * math.pi)
    cos_r, sin_r = math.cos(rotation), math.sin(rotation)
    inside = shape_fn(dx * cos_r + dy * sin_r, dy * cos_r - dx * sin_r, aspect)
    # Luminance contrast between the texture's two tones, so the texture survives grayscale.
    dark = light * rng.uniform(0.25, 0.6)
    tone = np.broadcast_to(_TEXTURES[texture](ys, xs, dy, dx, rng), inside.shape)
    if rng.random() < 0.3:
        tone = 1.0 - tone  # inverted polarity: light dots on dark, light lines on dark, ...
    patch = dark + (light - dark) * tone[..., None]
    image[top:bottom, left:right][inside] = patch[inside]
    mask[top:bottom, left:right][inside] = label


def _apply_nuisances(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Illumination gradient, optional blur and sensor noise; returns the uint8 image."""
    height, width = image.shape[:2]
    ys = np.linspace(-0.5, 0.5, height, dtype=np.float32)[:, None]
    xs = np.linspace(-0.5, 0.5, width, dtype=np.float32)[None, :]
    direction = rng.uniform(0, 2 * math.pi)
    gradient = xs * math.cos(direction) + ys * math.sin(direction)
    illumination = rng.uniform(0.75, 1.15) * (1.0 + rng.uniform(0.0, 0.6) * gradient)
    image = image * illumination[..., None]
    image = Image.fromarray(np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8))
    if rng.random() < 0.5:
        image = image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 1.0))))
    noisy = np.asarray(image, np.float32) + rng.normal(0.0, rng.uniform(2.0, 14.0), (height, width, 3))
    return np.round(np.clip(noisy, 0, 255)).astype(np.uint8)


def _render_sample(
    seed: int, stream: int, index: int, size_range: Tuple[int, int]
) -> Tuple[np.ndarray, np.ndarray]:
    """Render one image (H x W x 3 uint8) and its mask (H x W uint8) from its own random stream."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, stream, index]))
    size = (int(rng.integers(size_range[0], size_range[1] + 1)), int(rng.integers(size_range[0], size_range[1] + 1)))
    height, width = size
    image = _render_background(rng, size)
    mask = np.zeros(size, np.uint8)

    # Background clutter: irregular blobs with textures no class uses.
    for _ in range(int(rng.integers(0, 3))):
        lobes = (rng.uniform(0.15, 0.3), rng.uniform(0, 6.3), rng.uniform(0.05, 0.15), rng.uniform(0, 6.3))

        def blob(u, v, aspect, lobes=lobes):
            angle = np.arctan2(v, u)
            edge = 1.0 + lobes[0] * np.sin(3 * angle + lobes[1]) + lobes[2] * np.sin(7 * angle + lobes[3])
            return np.sqrt(u**2 + v**2) <= aspect * edge

        _paint(
            image, mask, rng, 0, blob, 0.8,
            "waves" if rng.random() < 0.5 else "speckle",
            radius=math.sqrt(rng.uniform(0.03, 0.08) * height * width / math.pi) / 0.8,
            centre=(rng.uniform(0, height), rng.uniform(0, width)),
            light=_background_colour(rng),
        )

    # Objects and decoys in random depth order: later ones occlude earlier ones.
    object_classes = rng.choice(len(_OBJECT_CLASSES), size=int(rng.integers(2, 6)), p=_OCCURRENCE)
    decoys = [_DECOYS[int(i)] for i in rng.choice(len(_DECOYS), size=int(rng.random() < 0.5))]
    # (label, shape, texture, area scale, palette); decoys take background colours.
    items = []
    for offset in object_classes:
        spec = _OBJECT_CLASSES[int(offset)]
        items.append((int(offset) + 1, spec.shape, spec.texture, spec.area_scale, spec.palette))
    items += [(0, shape, texture, _DECOY_AREA_SCALE, None) for shape, texture in decoys]
    for position in rng.permutation(len(items)):
        label, shape, texture, area_scale, palette = items[int(position)]
        shape_fn, aspect_range = _SHAPES[shape]
        # Pixel area as a fraction of the frame, log-uniform in [5 %, 15 %] before the class scale.
        area = math.exp(rng.uniform(math.log(0.05), math.log(0.15))) * area_scale * height * width
        _paint(
            image, mask, rng, label, shape_fn,
            rng.uniform(*aspect_range), texture,
            radius=math.sqrt(area / _unit_area(shape)),
            centre=(rng.uniform(0.1 * height, 0.9 * height), rng.uniform(0.1 * width, 0.9 * width)),
            light=_background_colour(rng) if palette is None else _object_colour(rng, palette),
        )
    return _apply_nuisances(image, rng), mask


# --------------------------------------------------------------------------------------------
# Dataset on disk
# --------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """The farcluss cache (built-in datasets, the project-pretrained encoder): ``$FARCLUSS_CACHE``,
    else ``$XDG_CACHE_HOME/farcluss``, else ``~/.cache/farcluss``."""
    root = os.environ.get("FARCLUSS_CACHE")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "farcluss")
    return Path(root).expanduser()


def default_benchmark_dir(seed: int = 0) -> Path:
    """Cache folder of the benchmark: `cache_dir()` / ``benchmark-v{GENERATOR_VERSION}-seed{seed}``."""
    return cache_dir() / f"benchmark-v{GENERATOR_VERSION}-seed{seed}"


def read_json_object(path: Path, name: str = METADATA_FILE) -> Optional[dict]:
    """The JSON object in `path`/`name`, or None when it is missing, unreadable or not an object."""
    try:
        with open(path / name, encoding="utf-8") as handle:
            metadata = json.load(handle)
    except (OSError, ValueError):
        return None
    return metadata if isinstance(metadata, dict) else None


def benchmark_is_complete(path) -> bool:
    """True when `path` holds a whole benchmark written by this generator version.

    ``benchmark.json`` is written last and the folder only appears under its final name once
    complete, so its presence plus the expected file counts identify a finished build.
    """
    path = Path(path)
    metadata = read_json_object(path)
    if metadata is None or metadata.get("generator_version") != GENERATOR_VERSION:
        return False
    try:
        counts = metadata["counts"]
        expected = int(counts["train"]) + int(counts["val"]) + int(counts["test"])
        images = sum(1 for entry in os.scandir(path / "images") if entry.name.endswith(".png"))
        masks = sum(1 for entry in os.scandir(path / "masks") if entry.name.endswith(".png"))
    except (KeyError, TypeError, ValueError, OSError):
        return False
    files_present = (path / "classes.txt").is_file() and all(
        (path / "splits" / name).is_file() for name in SPLIT_FILES
    )
    return files_present and images == expected and masks == expected


def _validated_parameters(
    seed: int, num_train: int, num_val: int, size_range: Sequence[int], labeled_fraction: float,
    num_test: int,
) -> dict:
    def is_int(value) -> bool:
        return isinstance(value, (int, np.integer)) and not isinstance(value, bool)

    if not is_int(seed) or seed < 0:
        raise ConfigError(f"benchmark seed must be a non-negative integer, got {seed!r}")
    if not is_int(num_train) or num_train < 2:
        raise ConfigError(f"benchmark num_train must be an integer >= 2, got {num_train!r}")
    if not is_int(num_val) or num_val < 1:
        raise ConfigError(f"benchmark num_val must be an integer >= 1, got {num_val!r}")
    if not is_int(num_test) or num_test < 1:
        raise ConfigError(f"benchmark num_test must be an integer >= 1, got {num_test!r}")
    if (
        len(size_range) != 2
        or not all(is_int(side) for side in size_range)
        or not 32 <= size_range[0] <= size_range[1]
    ):
        raise ConfigError(f"benchmark size_range must be two integers 32 <= low <= high, got {size_range!r}")
    if not 0.0 < float(labeled_fraction) < 1.0:
        raise ConfigError(f"benchmark labeled_fraction must be in (0, 1), got {labeled_fraction!r}")
    return {
        "seed": int(seed),
        "num_train": int(num_train),
        "num_val": int(num_val),
        "num_test": int(num_test),
        "size_range": [int(size_range[0]), int(size_range[1])],
        "labeled_fraction": float(labeled_fraction),
    }


def _labeled_count(num_train: int, labeled_fraction: float) -> int:
    # At least one labeled and one unlabeled image, so both loaders have data.
    return min(num_train - 1, max(1, round(num_train * labeled_fraction)))


def _write_split(path: Path, names: Sequence[str]) -> None:
    lines = "".join(f"images/{name} masks/{name}\n" for name in names)
    path.write_text(lines, encoding="utf-8")


def _class_table(counts: np.ndarray) -> Dict[str, float]:
    total = max(int(counts.sum()), 1)
    return {name: round(int(count) / total, 6) for name, count in zip(BENCHMARK_CLASSES, counts)}


def _write_benchmark(folder: Path, parameters: dict, progress: bool) -> None:
    """Render every sample into `folder`, then the split lists, and `benchmark.json` last."""
    seed, num_train, num_val = parameters["seed"], parameters["num_train"], parameters["num_val"]
    num_test = parameters["num_test"]
    size_range = tuple(parameters["size_range"])
    class_count = len(BENCHMARK_CLASSES)
    (folder / "images").mkdir()
    (folder / "masks").mkdir()
    (folder / "splits").mkdir()

    # the width of version 1 (train and val only), so train and val keep their file names; a
    # test index past it just takes more digits
    width = max(5, len(str(num_train + num_val - 1)))
    names = [f"{index:0{width}d}.png" for index in range(num_train + num_val + num_test)]
    splits = ("train", "val", "test")
    pixel_counts = {split: np.zeros(class_count, np.int64) for split in splits}
    image_counts = {split: np.zeros(class_count, np.int64) for split in splits}
    classes_per_image: List[np.ndarray] = []

    jobs = ([("train", _TRAIN_STREAM, i) for i in range(num_train)]
            + [("val", _VAL_STREAM, i) for i in range(num_val)]
            + [("test", _TEST_STREAM, i) for i in range(num_test)])
    bar = Progress(len(jobs), desc="benchmark", every=max(1, len(jobs) // 10), enabled=progress)
    for name, (split, stream, index) in zip(names, jobs):
        image, mask = _render_sample(seed, stream, index, size_range)
        Image.fromarray(image, mode="RGB").save(folder / "images" / name)
        Image.fromarray(mask, mode="L").save(folder / "masks" / name)
        per_class = np.bincount(mask.ravel(), minlength=class_count)
        pixel_counts[split] += per_class
        image_counts[split] += per_class > 0
        if split == "train":
            classes_per_image.append(per_class > 0)
        bar.update(1)
    bar.close()

    split_rng = np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_STREAM]))
    labeled_count = _labeled_count(num_train, parameters["labeled_fraction"])
    draw = split_rng.permutation(num_train)
    labeled = np.sort(draw[:labeled_count])
    unlabeled = np.setdiff1d(np.arange(num_train), labeled)
    _write_split(folder / "splits" / "labeled.txt", [names[i] for i in labeled])
    _write_split(folder / "splits" / "unlabeled.txt", [names[i] for i in unlabeled])
    # The half-size budget is the first half of the same draw, so its labeled images are a subset
    # of labeled.txt: a method compared at both budgets sees more labels, never other ones.
    labeled_half = np.sort(draw[:max(1, labeled_count // 2)])
    unlabeled_half = np.setdiff1d(np.arange(num_train), labeled_half)
    _write_split(folder / "splits" / "labeled_half.txt", [names[i] for i in labeled_half])
    _write_split(folder / "splits" / "unlabeled_half.txt", [names[i] for i in unlabeled_half])
    _write_split(folder / "splits" / "train_full.txt", names[:num_train])
    _write_split(folder / "splits" / "val.txt", names[num_train:num_train + num_val])
    _write_split(folder / "splits" / "test.txt", names[num_train + num_val:])
    (folder / "classes.txt").write_text("".join(f"{name}\n" for name in BENCHMARK_CLASSES), encoding="utf-8")

    labeled_image_counts = np.sum(np.stack(classes_per_image)[labeled], axis=0)
    labeled_half_image_counts = np.sum(np.stack(classes_per_image)[labeled_half], axis=0)
    metadata = {
        "generator_version": GENERATOR_VERSION,
        "parameters": parameters,
        "classes": BENCHMARK_CLASSES,
        "counts": {
            "train": num_train,
            "val": num_val,
            "test": num_test,
            "labeled": int(labeled.size),
            "unlabeled": int(unlabeled.size),
            "labeled_half": int(labeled_half.size),
            "unlabeled_half": int(unlabeled_half.size),
        },
        "class_pixel_frequency": {split: _class_table(counts) for split, counts in pixel_counts.items()},
        "class_pixel_counts": {
            split: dict(zip(BENCHMARK_CLASSES, map(int, counts))) for split, counts in pixel_counts.items()
        },
        "class_image_counts": {
            "train": dict(zip(BENCHMARK_CLASSES, map(int, image_counts["train"]))),
            "val": dict(zip(BENCHMARK_CLASSES, map(int, image_counts["val"]))),
            "test": dict(zip(BENCHMARK_CLASSES, map(int, image_counts["test"]))),
            "labeled": dict(zip(BENCHMARK_CLASSES, map(int, labeled_image_counts))),
            "labeled_half": dict(zip(BENCHMARK_CLASSES, map(int, labeled_half_image_counts))),
        },
    }
    (folder / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")


def _is_same_benchmark(path: Path, parameters: dict) -> bool:
    if not benchmark_is_complete(path):
        return False
    metadata = read_json_object(path)
    return metadata is not None and metadata.get("parameters") == parameters


def make_benchmark(
    out_dir,
    seed: int = 0,
    num_train: int = 2000,
    num_val: int = 300,
    size_range: Tuple[int, int] = (64, 96),
    labeled_fraction: float = 1 / 16,
    progress: bool = True,
    num_test: int = 500,
) -> Path:
    """Generate the benchmark into `out_dir` (or reuse it) and return its path.

    Splits: ``labeled`` is a seeded random ``labeled_fraction`` of the train images, ``unlabeled``
    the rest of train, ``labeled_half`` the first half of the same draw (a subset of ``labeled``)
    and ``unlabeled_half`` the rest of train, ``train_full`` all of train (the supervised ceiling), ``val`` the
    ``num_val`` validation images (for model selection), ``test`` the ``num_test`` held-back
    test images (never used to choose anything; report them once the choices are made on val).
    Image sides are drawn uniformly from ``size_range``.

    The build goes into a hidden staging folder beside `out_dir` that is renamed to `out_dir`
    only when complete, so an interrupted run never leaves a half dataset under the final name.
    An existing complete benchmark with the same parameters and generator version is returned
    unchanged; one with other parameters or another version is replaced. A non-empty folder that
    is not a benchmark is never touched (DataError).
    """
    parameters = _validated_parameters(seed, num_train, num_val, size_range, labeled_fraction, num_test)
    out = Path(out_dir).expanduser()
    if _is_same_benchmark(out, parameters):
        return out
    if out.exists():
        if not out.is_dir():
            raise DataError(f"benchmark output {out} exists and is not a folder")
        if read_json_object(out) is None and any(out.iterdir()):
            raise DataError(f"benchmark output {out} is a non-empty folder without {METADATA_FILE}; refusing to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)

    staging = _sibling_folder(out, "partial")
    try:
        _write_benchmark(staging, parameters, progress)
        _publish(staging, out, parameters)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _sibling_folder(out: Path, purpose: str) -> Path:
    """Create a new hidden folder next to `out` (same file system, so renames are atomic).

    Unlike `tempfile.mkdtemp` (mode 0700) it gets the usual umask-derived permissions, so a
    shared cache stays readable once the folder is renamed to `out`.
    """
    folder = out.parent / f".{out.name}.{purpose}-{os.getpid()}-{secrets.token_hex(4)}"
    folder.mkdir()
    return folder


def _publish(staging: Path, out: Path, parameters: dict,
             is_same: Callable[[Path, dict], bool] = _is_same_benchmark) -> None:
    """Rename the finished `staging` folder to `out`, replacing an outdated dataset there
    (`is_same`: does `out` already hold this dataset; also used by the digits dataset)."""
    if is_same(out, parameters):
        # Another process (e.g. a second DDP rank) published the same benchmark first.
        shutil.rmtree(staging, ignore_errors=True)
        return
    stale: Optional[Path] = None
    if out.exists():
        stale = _sibling_folder(out, "stale")
        os.rename(out, stale / "old")
    try:
        os.rename(staging, out)
    except OSError:
        # Lost a race between the check above and the rename: keep the winner if it is ours.
        if not is_same(out, parameters):
            raise
        shutil.rmtree(staging, ignore_errors=True)
    finally:
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)
