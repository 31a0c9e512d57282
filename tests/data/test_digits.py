"""The built-in digits dataset (`data/digits.py`): determinism, splits, no train/eval leakage,
the long tail, loading through `build_data`, and the error without the `data` extra."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from farcluss import cli
from farcluss.config import load_config
from farcluss.data import digits
from farcluss.data.build import BUILTIN_DIGITS, build_data, dataset_root, val_dataset
from farcluss.data.digits import (
    DIGIT_CLASSES,
    GENERATOR_VERSION,
    PHOTOGRAPHS,
    SPLIT_FILES,
    class_probabilities,
    default_digits_dir,
    digits_is_complete,
    make_digits,
    render_sample,
    source_split,
)
from farcluss.errors import ConfigError, DataError
from farcluss.log import setup_logging

TINY = dict(num_train=16, num_val=4, num_test=4, size=48, progress=False)


def file_hashes(folder: Path) -> dict:
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def split_names(folder: Path, name: str) -> list:
    return [line.split()[0] for line in (folder / "splits" / name).read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_digits(tmp_path_factory.mktemp("digits") / "tiny", seed=3, **TINY)


@pytest.fixture(scope="module")
def moderate(tmp_path_factory) -> Path:
    return make_digits(tmp_path_factory.mktemp("digits") / "moderate", seed=0, num_train=240,
                       num_val=2, num_test=2, size=32, progress=False)


def test_same_seed_writes_byte_identical_files_and_another_seed_other_images(tiny, tmp_path):
    again = make_digits(tmp_path / "again", seed=3, **TINY)
    other = make_digits(tmp_path / "other", seed=4, **TINY)
    first, second, third = file_hashes(tiny), file_hashes(again), file_hashes(other)
    images = [name for name in first if name.startswith("images/")]
    assert len(images) == 24 and len(first) == 2 * 24 + len(SPLIT_FILES) + 2
    assert first == second
    assert all(first[name] != third[name] for name in images)
    assert first["classes.txt"] == third["classes.txt"]


def test_classes_and_metadata(tiny):
    assert (tiny / "classes.txt").read_text().split() == DIGIT_CLASSES
    metadata = json.loads((tiny / "digits.json").read_text())
    assert metadata["generator_version"] == GENERATOR_VERSION
    assert metadata["counts"]["train"] == 16 and metadata["counts"]["test"] == 4
    for split in ("train", "val", "test"):
        frequencies = metadata["class_pixel_frequency"][split]
        assert list(frequencies) == DIGIT_CLASSES
        assert sum(frequencies.values()) == pytest.approx(1.0, abs=1e-4)
    # the recorded pixel counts are those of the masks on disk
    counted = np.zeros(len(DIGIT_CLASSES), np.int64)
    for name in split_names(tiny, "train_full.txt"):
        mask = np.asarray(Image.open(tiny / name.replace("images/", "masks/")))
        counted += np.bincount(mask.ravel(), minlength=len(DIGIT_CLASSES))
    assert list(metadata["class_pixel_counts"]["train"].values()) == counted.tolist()


def test_splits_are_disjoint_and_complete(tiny):
    labeled, unlabeled = split_names(tiny, "labeled.txt"), split_names(tiny, "unlabeled.txt")
    train, val, test = (split_names(tiny, name) for name in ("train_full.txt", "val.txt", "test.txt"))
    assert len(labeled) == 1  # 1/16 of 16
    assert not set(labeled) & set(unlabeled) and sorted(labeled + unlabeled) == sorted(train)
    assert not set(train) & set(val) and not set(train) & set(test) and not set(val) & set(test)
    on_disk = {f"images/{path.name}" for path in (tiny / "images").iterdir()}
    assert set(train) | set(val) | set(test) == on_disk
    assert len(train) + len(val) + len(test) == len(on_disk)


def test_source_digits_are_split_before_rendering():
    sources = source_split(0)
    train, val, test = (set(sources[split].tolist()) for split in ("train", "val", "test"))
    assert not train & val and not train & test and not val & test
    assert len(train | val | test) == 1797
    _, targets = digits._source_digits()
    for indices in sources.values():
        assert set(targets[indices].tolist()) == set(range(10))
    assert not np.array_equal(source_split(1)["val"], sources["val"])


def test_each_split_renders_from_its_own_source_digits_only():
    sources = source_split(0)
    empty = np.array([], np.int64)
    for split in ("train", "val", "test"):
        only_own = {name: (indices if name == split else empty) for name, indices in sources.items()}
        for index in range(3):
            image, mask = render_sample(0, split, index, 48, 15.0, sources)
            image_own, mask_own = render_sample(0, split, index, 48, 15.0, only_own)
            assert np.array_equal(image, image_own) and np.array_equal(mask, mask_own)


def test_photograph_regions_of_train_val_and_test_do_not_overlap():
    for name in PHOTOGRAPHS:
        shape = digits._photograph(name).shape[:2]
        boxes = [digits._region(shape, split) for split in ("train", "val", "test")]
        covered = np.zeros(shape, np.int64)
        for top, left, height, width in boxes:
            assert min(height, width) >= 96, name  # a full-size crop fits
            covered[top:top + height, left:left + width] += 1
        assert covered.max() == 1, name


def test_train_is_long_tailed_and_evaluation_balanced(moderate):
    probabilities = class_probabilities("train", 15.0)
    assert np.all(np.diff(probabilities) < 0)
    assert probabilities[0] / probabilities[-1] == pytest.approx(15.0)
    assert np.allclose(class_probabilities("test", 15.0), 0.1)
    metadata = json.loads((moderate / "digits.json").read_text())
    images = np.array([metadata["class_image_counts"]["train"][f"digit_{d}"] for d in range(10)])
    pixels = np.array([metadata["class_pixel_counts"]["train"][f"digit_{d}"] for d in range(10)])
    # measured on the rendered masks: the common half is drawn far more often than the rare half
    assert images[:5].sum() > 3 * images[5:].sum()
    assert pixels[0] > 5 * pixels[9] and pixels[:5].sum() > 3 * pixels[5:].sum()


def test_a_digits_folder_loads_through_build_data(tiny):
    cfg = load_config(None, [f"data.root={tiny}", "data.unlabeled=splits/unlabeled.txt",
                             "data.val=splits/test.txt", "method.name=fixmatch"])
    data = build_data(cfg)
    assert data.classes == DIGIT_CLASSES
    assert (len(data.labeled), len(data.unlabeled), len(data.val)) == (1, 15, 4)
    sample = val_dataset(cfg, data, len(data.classes))[0]
    assert sample["image"].shape == (3, 48, 48)
    assert int(sample["mask"].max()) < len(DIGIT_CLASSES)


def test_builtin_digits_is_reused_once_complete(monkeypatch, tmp_path, capsys, restore_logging):
    monkeypatch.setenv("FARCLUSS_CACHE", str(tmp_path / "cache"))
    made = make_digits(default_digits_dir(), **TINY)
    assert made.name == f"digits-v{GENERATOR_VERSION}-seed0" and digits_is_complete(made)
    setup_logging(rank=0)
    capsys.readouterr()
    assert dataset_root(load_config(None, [f"data.root={BUILTIN_DIGITS}"])) == made
    assert "making" not in capsys.readouterr().err


def test_an_incomplete_folder_is_not_complete_and_a_foreign_one_is_refused(tiny, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in tiny.rglob("*"):
        target = copy / path.relative_to(tiny)
        target.mkdir(exist_ok=True) if path.is_dir() else target.write_bytes(path.read_bytes())
    assert digits_is_complete(copy)
    next((copy / "images").iterdir()).unlink()
    assert not digits_is_complete(copy)
    assert digits_is_complete(make_digits(copy, seed=3, **TINY))  # rebuilt in place
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="refusing to overwrite"):
        make_digits(foreign, **TINY)
    assert (foreign / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("key, value", [("num_train", 1), ("num_test", 0), ("size", 16), ("tail", 0.5)])
def test_bad_parameters_are_config_errors_naming_them(tmp_path, key, value):
    with pytest.raises(ConfigError, match=key.split("_")[-1]):
        make_digits(tmp_path / "x", **{**TINY, key: value})


def test_the_source_digits_are_sklearns_load_digits():
    bunch = load_digits()
    images, targets = digits._source_digits()
    assert np.array_equal(images * 16.0, bunch.images) and np.array_equal(targets, bunch.target)


@pytest.mark.parametrize("missing", ["SKLEARN_DIGITS", "skimage_data"])
def test_without_the_data_extra_the_error_says_what_to_install(monkeypatch, tmp_path, capsys,
                                                               restore_logging, missing):
    monkeypatch.setattr(digits, missing, None)
    with pytest.raises(DataError, match=r"pip install farcluss\[data\]"):
        make_digits(tmp_path / "x", **TINY)
    monkeypatch.setenv("FARCLUSS_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"pip install farcluss\[data\]"):
        build_data(load_config(None, [f"data.root={BUILTIN_DIGITS}"]))
    capsys.readouterr()
    assert cli.main(["data", "make-digits", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install farcluss[data]" in err[0]
    assert not (tmp_path / "y").exists()


def test_make_digits_command(tmp_path, capsys):
    out = tmp_path / "made"
    assert cli.main(["data", "make-digits", str(out), "--seed", "2", "--num-train", "4",
                     "--num-val", "1", "--num-test", "1"]) == 0
    assert "digits dataset ready" in capsys.readouterr().out
    metadata = json.loads((out / "digits.json").read_text())
    assert metadata["parameters"]["seed"] == 2 and metadata["counts"]["train"] == 4
