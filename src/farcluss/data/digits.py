"""The built-in digits dataset: real handwriting on real photographs, long-tailed, from a seed.

scikit-learn's 1,797 bundled handwritten digits (8x8, the data of ``sklearn.datasets.load_digits``) are
upscaled smoothly, tinted and pasted onto random crops of scikit-image's bundled photographs
(``skimage.data``). The mask of a digit is its stroke region (the smooth upscaled strokes,
thresholded and dilated by one pixel). Written in the generic folder layout, like the benchmark::

    OUT/
      images/00000.png ...      RGB, SIZE x SIZE (96 by default)
      masks/00000.png ...       mode 'L', 0 = background, 1 + d = digit d
      classes.txt               background, digit_0 ... digit_9
      splits/labeled.txt  splits/unlabeled.txt  splits/train_full.txt  splits/val.txt  splits/test.txt
      digits.json               generator version, parameters, counts, class pixel frequencies

Classes: background + 10 digits = 11. Train is long-tailed: digit ``d`` is drawn with probability
proportional to ``ratio ** d`` (0 the most common), with ``ratio ** 9 = 1 / tail`` so that digit 9
is ``tail`` (15 by default) times rarer than digit 0 by occurrence. Val and test draw the digits
uniformly, so every class has pixels to score (the usual long-tailed protocol: imbalanced training
set, balanced evaluation). 1-3 digits per image, each with its own random colour, polarity
(lighter or darker than the photograph under it) and contrast, so colour does not give the class.

No leakage between train and evaluation: the 1,797 source digits are split first (per class, 60 %
train / 15 % val / 25 % test, seeded), and each photograph is cut into regions: train crops come
from its left two thirds, val crops from the top half of its right third, test crops from the
bottom half of its right third.

Every image is rendered from its own random stream ``(seed, split, index)``, so one seed writes
byte-identical files, and train image ``i`` does not depend on the split sizes.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import shutil
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image, ImageFilter

from farcluss.data.benchmark import _labeled_count, _publish
from farcluss.data.benchmark import read_json_object
from farcluss.data.benchmark import _sibling_folder, _write_split, cache_dir
from farcluss.errors import ConfigError, DataError
from farcluss.log import Progress

try:  # the `data` extra: pip install farcluss[data]
    from skimage import data as skimage_data
except ImportError:  # pragma: no cover - exercised by monkeypatching in the tests
    skimage_data = None

# The file `sklearn.datasets.load_digits` reads, found without importing scikit-learn: importing
# sklearn.datasets costs ~1.6 s of CPU, which every farcluss process would pay (build.py imports
# this module). tests/data/test_digits.py checks that it gives load_digits()'s arrays.
_SKLEARN = importlib.util.find_spec("sklearn")
SKLEARN_DIGITS: Optional[Path] = (
    Path(_SKLEARN.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    if _SKLEARN is not None and _SKLEARN.submodule_search_locations else None)

# Bump whenever the rendered pixels, the split selection or the file layout change.
GENERATOR_VERSION = 1

DIGIT_CLASSES: List[str] = ["background"] + [f"digit_{digit}" for digit in range(10)]
SPLIT_FILES = ("labeled.txt", "unlabeled.txt", "train_full.txt", "val.txt", "test.txt")
METADATA_FILE = "digits.json"
MISSING_DEPENDENCY = ("builtin:digits needs scikit-learn and scikit-image: "
                      "pip install farcluss[data]")

SPLITS = ("train", "val", "test")
# random streams: one per split's images, the labeled draw, the source-digit split
_STREAMS = {"train": 0, "val": 1, "test": 2}
_LABELED_STREAM, _SOURCE_STREAM = 3, 4
# share of each class's source digits that go to train / val (test gets the rest)
_SOURCE_SHARES = (0.60, 0.15)

# bundled with scikit-image (no download); grey ones are repeated into three channels
PHOTOGRAPHS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "hubble_deep_field",
               "immunohistochemistry", "brick", "grass", "gravel", "moon", "motorcycle_left")


def _require_dependencies() -> None:
    if SKLEARN_DIGITS is None or skimage_data is None:
        raise DataError(MISSING_DEPENDENCY)
    if not SKLEARN_DIGITS.is_file():
        raise DataError(f"{SKLEARN_DIGITS} is missing: reinstall scikit-learn (pip install farcluss[data])")


@lru_cache(maxsize=None)
def _photograph(name: str) -> np.ndarray:
    """A bundled photograph as H x W x 3 float32 in [0, 1]."""
    if name == "motorcycle_left":
        image = skimage_data.stereo_motorcycle()[0]
    else:
        image = getattr(skimage_data, name)()
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return image[..., :3].astype(np.float32) / 255.0


def _region(shape: Tuple[int, int], split: str) -> Tuple[int, int, int, int]:
    """(top, left, height, width) of the part of a photograph a split crops from."""
    height, width = shape
    cut = (2 * width) // 3
    if split == "train":
        return 0, 0, height, cut
    half = height // 2
    top = 0 if split == "val" else half
    return top, cut, (half if split == "val" else height - half), width - cut


@lru_cache(maxsize=None)
def _source_digits() -> Tuple[np.ndarray, np.ndarray]:
    """sklearn's 1,797 digits: images N x 8 x 8 in [0, 1] (float32) and labels N (int64)."""
    _require_dependencies()
    with gzip.open(SKLEARN_DIGITS, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",")
    images = table[:, :-1].reshape(-1, 8, 8).astype(np.float32) / 16.0
    return images, table[:, -1].astype(np.int64)


def source_split(seed: int) -> Dict[str, np.ndarray]:
    """Indices into sklearn's digits per split: per class 60 % train, 15 % val, 25 % test."""
    _, targets = _source_digits()
    rng = np.random.default_rng(np.random.SeedSequence([seed, _SOURCE_STREAM]))
    parts: Dict[str, List[np.ndarray]] = {split: [] for split in SPLITS}
    for digit in range(10):
        members = rng.permutation(np.flatnonzero(targets == digit))
        n_train = round(len(members) * _SOURCE_SHARES[0])
        n_val = round(len(members) * _SOURCE_SHARES[1])
        parts["train"].append(members[:n_train])
        parts["val"].append(members[n_train:n_train + n_val])
        parts["test"].append(members[n_train + n_val:])
    return {split: np.sort(np.concatenate(chunks)) for split, chunks in parts.items()}


def class_probabilities(split: str, tail: float) -> np.ndarray:
    """Probability of each digit 0..9: geometric (digit 9 `tail` times rarer) in train, uniform else."""
    if split != "train":
        return np.full(10, 0.1)
    weights = (1.0 / tail) ** (np.arange(10) / 9.0)
    return weights / weights.sum()


def _background(rng: np.random.Generator, split: str, size: int) -> np.ndarray:
    photo = _photograph(PHOTOGRAPHS[int(rng.integers(len(PHOTOGRAPHS)))])
    top, left, height, width = _region(photo.shape[:2], split)
    side = int(rng.integers(size, min(2 * size, height, width) + 1))
    y = top + int(rng.integers(0, height - side + 1))
    x = left + int(rng.integers(0, width - side + 1))
    crop = photo[y:y + side, x:x + side]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    if side != size:
        crop = np.asarray(Image.fromarray(np.round(crop * 255).astype(np.uint8)).resize(
            (size, size), Image.BICUBIC), np.float32) / 255.0
    return np.ascontiguousarray(crop)


def _digit_stroke(source: np.ndarray, side: int, angle: float) -> np.ndarray:
    """The 8x8 digit upscaled smoothly to side x side (with a 2 px margin), rotated: [0, 1]."""
    inner = max(4, side - 4)
    image = Image.fromarray(source, mode="F").resize((inner, inner), Image.BICUBIC)
    canvas = Image.new("F", (side, side), 0.0)
    canvas.paste(image, ((side - inner) // 2, (side - inner) // 2))
    canvas = canvas.rotate(angle, resample=Image.BILINEAR)
    return np.clip(np.asarray(canvas, np.float32), 0.0, 1.0)


def _paste_digit(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, source: np.ndarray,
                 label: int, side: int) -> None:
    size = image.shape[0]
    strokes = _digit_stroke(source, side, float(rng.uniform(-15.0, 15.0)))
    # the stroke region: thresholded smooth strokes, dilated by one pixel (a filled blob)
    region = Image.fromarray(((strokes > 0.35) * 255).astype(np.uint8), mode="L")
    region = np.asarray(region.filter(ImageFilter.MaxFilter(3))) > 0
    top = int(rng.integers(-side // 6, size - side + side // 6 + 1))
    left = int(rng.integers(-side // 6, size - side + side // 6 + 1))
    # clip the digit's box to the frame (a digit may be cut by the border)
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + side, size), min(left + side, size)
    strokes = strokes[y0 - top:y1 - top, x0 - left:x1 - left]
    region = region[y0 - top:y1 - top, x0 - left:x1 - left]
    patch = image[y0:y1, x0:x1]
    # colour: random hue and saturation; brightness away from the photograph under the digit
    under = float(patch[region].mean()) if region.any() else 0.5
    lighter = under < 0.35 or (under <= 0.65 and rng.random() < 0.5)
    brightness = rng.uniform(min(1.0, under + 0.3), 1.0) if lighter else rng.uniform(0.0, max(0.0, under - 0.3))
    tint = rng.uniform(0.0, 1.0, 3)
    saturation = rng.uniform(0.0, 0.8)
    colour = brightness * (1.0 - saturation) + saturation * tint * brightness / max(tint.max(), 1e-6)
    alpha = np.clip(strokes * rng.uniform(1.2, 2.0), 0.0, 1.0) * rng.uniform(0.75, 1.0)
    patch[...] = patch * (1.0 - alpha[..., None]) + colour[None, None, :] * alpha[..., None]
    mask[y0:y1, x0:x1][region] = label


def render_sample(seed: int, split: str, index: int, size: int, tail: float,
                  sources: Dict[str, np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
    """One image (size x size x 3 uint8) and its mask (size x size uint8)."""
    digits, targets = _source_digits()
    rng = np.random.default_rng(np.random.SeedSequence([seed, _STREAMS[split], index]))
    image = _background(rng, split, size)
    image = image * rng.uniform(0.7, 1.1) + rng.uniform(-0.1, 0.1)
    image = np.clip(image, 0.0, 1.0).astype(np.float32)
    mask = np.zeros((size, size), np.uint8)
    pool = sources[split]
    probabilities = class_probabilities(split, tail)
    for _ in range(int(rng.integers(1, 4))):
        digit = int(rng.choice(10, p=probabilities))
        candidates = pool[targets[pool] == digit]
        source = digits[int(candidates[int(rng.integers(len(candidates)))])]
        side = int(rng.integers(round(0.3 * size), round(0.48 * size) + 1))
        _paste_digit(image, mask, rng, source, digit + 1, side)
    noisy = image * 255.0 + rng.normal(0.0, rng.uniform(1.0, 6.0), image.shape)
    return np.round(np.clip(noisy, 0, 255)).astype(np.uint8), mask


# --------------------------------------------------------------------------------------------
# Dataset on disk
# --------------------------------------------------------------------------------------------


def default_digits_dir(seed: int = 0) -> Path:
    """Beside the benchmark in the farcluss cache: ``digits-v{GENERATOR_VERSION}-seed{seed}``."""
    return cache_dir() / f"digits-v{GENERATOR_VERSION}-seed{seed}"


def digits_is_complete(path) -> bool:
    """True when `path` holds a whole digits dataset of this generator version (digits.json is
    written last; the file counts must match it)."""
    path = Path(path)
    metadata = read_json_object(path, METADATA_FILE)
    if metadata is None or metadata.get("generator_version") != GENERATOR_VERSION:
        return False
    try:
        expected = sum(int(metadata["counts"][split]) for split in SPLITS)
        images = sum(1 for entry in (path / "images").iterdir() if entry.name.endswith(".png"))
        masks = sum(1 for entry in (path / "masks").iterdir() if entry.name.endswith(".png"))
    except (KeyError, TypeError, ValueError, OSError):
        return False
    files_present = (path / "classes.txt").is_file() and all(
        (path / "splits" / name).is_file() for name in SPLIT_FILES)
    return files_present and images == expected and masks == expected


def _is_same_digits(path: Path, parameters: dict) -> bool:
    if not digits_is_complete(path):
        return False
    metadata = read_json_object(path, METADATA_FILE)
    return metadata is not None and metadata.get("parameters") == parameters


def _validated_parameters(seed, num_train, num_val, num_test, size, labeled_fraction, tail) -> dict:
    def is_int(value) -> bool:
        return isinstance(value, (int, np.integer)) and not isinstance(value, bool)

    if not is_int(seed) or seed < 0:
        raise ConfigError(f"digits seed must be a non-negative integer, got {seed!r}")
    if not is_int(num_train) or num_train < 2:
        raise ConfigError(f"digits num_train must be an integer >= 2, got {num_train!r}")
    for name, value in (("num_val", num_val), ("num_test", num_test)):
        if not is_int(value) or value < 1:
            raise ConfigError(f"digits {name} must be an integer >= 1, got {value!r}")
    if not is_int(size) or not 32 <= size <= 256:
        raise ConfigError(f"digits size must be an integer in [32, 256], got {size!r}")
    if not 0.0 < float(labeled_fraction) < 1.0:
        raise ConfigError(f"digits labeled_fraction must be in (0, 1), got {labeled_fraction!r}")
    if not float(tail) >= 1.0:
        raise ConfigError(f"digits tail must be >= 1 (1 = balanced), got {tail!r}")
    return {"seed": int(seed), "num_train": int(num_train), "num_val": int(num_val),
            "num_test": int(num_test), "size": int(size),
            "labeled_fraction": float(labeled_fraction), "tail": float(tail)}


def _write_digits(folder: Path, parameters: dict, progress: bool) -> None:
    seed, size, tail = parameters["seed"], parameters["size"], parameters["tail"]
    counts = {split: parameters[f"num_{split}"] for split in SPLITS}
    sources = source_split(seed)
    for sub in ("images", "masks", "splits"):
        (folder / sub).mkdir()
    total = sum(counts.values())
    width = max(5, len(str(total - 1)))
    jobs = [(split, index) for split in SPLITS for index in range(counts[split])]
    names = {split: [] for split in SPLITS}
    pixel_counts = {split: np.zeros(len(DIGIT_CLASSES), np.int64) for split in SPLITS}
    image_counts = {split: np.zeros(len(DIGIT_CLASSES), np.int64) for split in SPLITS}
    bar = Progress(len(jobs), desc="digits", every=max(1, len(jobs) // 10), enabled=progress)
    for number, (split, index) in enumerate(jobs):
        image, mask = render_sample(seed, split, index, size, tail, sources)
        name = f"{number:0{width}d}.png"
        Image.fromarray(image, mode="RGB").save(folder / "images" / name)
        Image.fromarray(mask, mode="L").save(folder / "masks" / name)
        per_class = np.bincount(mask.ravel(), minlength=len(DIGIT_CLASSES))
        pixel_counts[split] += per_class
        image_counts[split] += per_class > 0
        names[split].append(name)
        bar.update(1)
    bar.close()

    rng = np.random.default_rng(np.random.SeedSequence([seed, _LABELED_STREAM]))
    train = names["train"]
    labeled_count = _labeled_count(len(train), parameters["labeled_fraction"])
    labeled = np.sort(rng.permutation(len(train))[:labeled_count])
    unlabeled = np.setdiff1d(np.arange(len(train)), labeled)
    _write_split(folder / "splits" / "labeled.txt", [train[i] for i in labeled])
    _write_split(folder / "splits" / "unlabeled.txt", [train[i] for i in unlabeled])
    _write_split(folder / "splits" / "train_full.txt", train)
    _write_split(folder / "splits" / "val.txt", names["val"])
    _write_split(folder / "splits" / "test.txt", names["test"])
    (folder / "classes.txt").write_text("".join(f"{name}\n" for name in DIGIT_CLASSES),
                                        encoding="utf-8")

    def table(values: np.ndarray, frequency: bool) -> dict:
        total_pixels = max(int(values.sum()), 1)
        return {name: (round(int(value) / total_pixels, 6) if frequency else int(value))
                for name, value in zip(DIGIT_CLASSES, values)}

    metadata = {
        "generator_version": GENERATOR_VERSION,
        "parameters": parameters,
        "classes": DIGIT_CLASSES,
        "counts": {**counts, "labeled": int(labeled.size), "unlabeled": int(unlabeled.size)},
        "source_digits": {split: int(indices.size) for split, indices in sources.items()},
        "photographs": list(PHOTOGRAPHS),
        "class_pixel_frequency": {split: table(pixel_counts[split], True) for split in SPLITS},
        "class_pixel_counts": {split: table(pixel_counts[split], False) for split in SPLITS},
        "class_image_counts": {split: table(image_counts[split], False) for split in SPLITS},
    }
    (folder / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")


def make_digits(out_dir, seed: int = 0, num_train: int = 1500, num_val: int = 300,
                num_test: int = 500, size: int = 96, labeled_fraction: float = 1 / 16,
                tail: float = 15.0, progress: bool = True) -> Path:
    """Generate the digits dataset into `out_dir` (or reuse it) and return its path.

    Splits: ``labeled`` (a seeded `labeled_fraction` of train), ``unlabeled`` (the rest),
    ``train_full``, ``val`` and ``test``. Built in a hidden staging folder and renamed into place
    when complete (as the benchmark); an existing complete dataset with the same parameters is
    reused, one with other parameters or version replaced, a foreign non-empty folder refused.
    """
    _require_dependencies()
    parameters = _validated_parameters(seed, num_train, num_val, num_test, size,
                                       labeled_fraction, tail)
    out = Path(out_dir).expanduser()
    if _is_same_digits(out, parameters):
        return out
    if out.exists():
        if not out.is_dir():
            raise DataError(f"digits output {out} exists and is not a folder")
        if read_json_object(out, METADATA_FILE) is None and any(out.iterdir()):
            raise DataError(f"digits output {out} is a non-empty folder without {METADATA_FILE}; "
                            "refusing to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = _sibling_folder(out, "partial")
    try:
        _write_digits(staging, parameters, progress)
        _publish(staging, out, parameters, is_same=_is_same_digits)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
