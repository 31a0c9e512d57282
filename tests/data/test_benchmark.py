import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from farcluss.data import benchmark
from farcluss.data.benchmark import (
    BENCHMARK_CLASSES,
    GENERATOR_VERSION,
    SPLIT_FILES,
    benchmark_is_complete,
    default_benchmark_dir,
    make_benchmark,
)
from farcluss.errors import ConfigError, DataError

TINY = dict(num_train=24, num_val=6, progress=False)


def file_hashes(folder: Path) -> dict:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def read_split(folder: Path, name: str) -> list:
    return [line.split() for line in (folder / "splits" / name).read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_benchmark(tmp_path_factory.mktemp("tiny") / "bench", seed=3, **TINY)


@pytest.fixture(scope="module")
def moderate(tmp_path_factory) -> Path:
    return make_benchmark(tmp_path_factory.mktemp("moderate") / "bench", seed=0, num_train=300, num_val=20, progress=False)


def test_same_seed_writes_byte_identical_files(tiny, tmp_path):
    again = make_benchmark(tmp_path / "again", seed=3, **TINY)
    first, second = file_hashes(tiny), file_hashes(again)
    assert len(first) == 30 + 30 + 6  # images, masks, classes.txt, 4 split lists, benchmark.json
    assert first == second


def test_different_seed_writes_different_images(tiny, tmp_path):
    other = make_benchmark(tmp_path / "other", seed=4, **TINY)
    first, second = file_hashes(tiny), file_hashes(other)
    assert first["classes.txt"] == second["classes.txt"]
    differing = [name for name in first if name.startswith("images/") and first[name] != second[name]]
    assert len(differing) == 30


def test_train_image_does_not_depend_on_dataset_size(tiny, tmp_path):
    # Each image has its own random stream, so a larger build extends a smaller one.
    larger = make_benchmark(tmp_path / "larger", seed=3, num_train=30, num_val=6, progress=False)
    assert (tiny / "images" / "00007.png").read_bytes() == (larger / "images" / "00007.png").read_bytes()


def test_layout_classes_splits_and_masks(tiny):
    classes = (tiny / "classes.txt").read_text().splitlines()
    assert classes == BENCHMARK_CLASSES
    assert classes[0] == "background" and len(classes) == 9

    labeled = read_split(tiny, "labeled.txt")
    unlabeled = read_split(tiny, "unlabeled.txt")
    train_full = read_split(tiny, "train_full.txt")
    val = read_split(tiny, "val.txt")
    assert len(labeled) == round(24 / 16) == 2
    assert len(unlabeled) == 22 and len(train_full) == 24 and len(val) == 6
    labeled_images = {image for image, _ in labeled}
    unlabeled_images = {image for image, _ in unlabeled}
    val_images = {image for image, _ in val}
    assert not labeled_images & unlabeled_images
    assert labeled_images | unlabeled_images == {image for image, _ in train_full}
    assert not val_images & (labeled_images | unlabeled_images)

    for image_path, mask_path in train_full + val:
        assert image_path.startswith("images/") and mask_path == "masks/" + image_path[len("images/"):]
        with Image.open(tiny / image_path) as image, Image.open(tiny / mask_path) as mask:
            assert image.mode == "RGB" and mask.mode == "L"
            assert image.size == mask.size
            assert all(64 <= side <= 96 for side in image.size)
            values = np.asarray(mask)
        assert values.max() < len(classes)

    metadata = json.loads((tiny / "benchmark.json").read_text())
    assert metadata["generator_version"] == GENERATOR_VERSION
    assert metadata["parameters"]["seed"] == 3
    assert metadata["counts"] == {"train": 24, "val": 6, "labeled": 2, "unlabeled": 22}
    assert sum(metadata["class_pixel_frequency"]["train"].values()) == pytest.approx(1.0, abs=1e-4)


def test_class_frequencies_are_long_tailed_and_complete(moderate):
    pixel_counts = np.zeros(len(BENCHMARK_CLASSES), np.int64)
    for _, mask_path in read_split(moderate, "train_full.txt"):
        mask = np.asarray(Image.open(moderate / mask_path))
        pixel_counts += np.bincount(mask.ravel(), minlength=len(BENCHMARK_CLASSES))
    object_counts = pixel_counts[1:]
    assert (pixel_counts > 0).all()
    assert object_counts.min() * 10 <= object_counts.max()
    # The background is the majority class but objects still cover a sizeable share.
    assert 0.5 < pixel_counts[0] / pixel_counts.sum() < 0.9
    # The recorded statistics are the ones measured from the masks.
    recorded = json.loads((moderate / "benchmark.json").read_text())["class_pixel_counts"]["train"]
    assert [recorded[name] for name in BENCHMARK_CLASSES] == pixel_counts.tolist()


def test_complete_benchmark_is_reused_without_rendering(tiny, monkeypatch):
    before = file_hashes(tiny)
    monkeypatch.setattr(benchmark, "_render_sample", lambda *args: pytest.fail("rendered again"))
    assert make_benchmark(tiny, seed=3, **TINY) == tiny
    assert file_hashes(tiny) == before


def test_other_parameters_or_version_replace_the_benchmark(tmp_path, monkeypatch):
    out = make_benchmark(tmp_path / "bench", seed=0, **TINY)
    make_benchmark(out, seed=1, **TINY)
    assert json.loads((out / "benchmark.json").read_text())["parameters"]["seed"] == 1

    monkeypatch.setattr(benchmark, "GENERATOR_VERSION", GENERATOR_VERSION + 1)
    assert not benchmark_is_complete(out)
    make_benchmark(out, seed=1, **TINY)
    assert json.loads((out / "benchmark.json").read_text())["generator_version"] == GENERATOR_VERSION + 1
    assert benchmark_is_complete(out)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["bench"]


def test_interrupted_build_leaves_no_complete_looking_output(tmp_path, monkeypatch):
    render = benchmark._render_sample
    calls = []

    def render_then_fail(*args):
        calls.append(args)
        if len(calls) == 10:
            raise KeyboardInterrupt
        return render(*args)

    monkeypatch.setattr(benchmark, "_render_sample", render_then_fail)
    with pytest.raises(KeyboardInterrupt):
        make_benchmark(tmp_path / "bench", seed=0, **TINY)
    assert list(tmp_path.iterdir()) == []
    assert not benchmark_is_complete(tmp_path / "bench")

    # A build killed outright leaves its staging folder behind; it never counts as the output.
    monkeypatch.setattr(benchmark, "_render_sample", render)
    (tmp_path / ".bench.partial-killed" / "images").mkdir(parents=True)
    out = make_benchmark(tmp_path / "bench", seed=0, **TINY)
    assert benchmark_is_complete(out)


def test_missing_file_makes_benchmark_incomplete(tmp_path):
    out = make_benchmark(tmp_path / "bench", seed=0, **TINY)
    (out / "masks" / "00005.png").unlink()
    assert not benchmark_is_complete(out)
    make_benchmark(out, seed=0, **TINY)
    assert benchmark_is_complete(out)


def test_refuses_to_overwrite_a_folder_that_is_not_a_benchmark(tmp_path):
    user_data = tmp_path / "my_data"
    user_data.mkdir()
    (user_data / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="my_data"):
        make_benchmark(user_data, **TINY)
    assert (user_data / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    "arguments, key",
    [
        (dict(seed=-1), "seed"),
        (dict(num_train=1), "num_train"),
        (dict(num_val=0), "num_val"),
        (dict(size_range=(96, 64)), "size_range"),
        (dict(labeled_fraction=1.5), "labeled_fraction"),
    ],
)
def test_invalid_arguments_raise_config_error(tmp_path, arguments, key):
    with pytest.raises(ConfigError, match=key):
        make_benchmark(tmp_path / "bench", **{**TINY, **arguments})
    assert not (tmp_path / "bench").exists()


def test_default_dir_honours_cache_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("FARCLUSS_CACHE", str(tmp_path))
    assert default_benchmark_dir() == tmp_path / f"benchmark-v{GENERATOR_VERSION}-seed0"
    assert default_benchmark_dir(seed=5).name.endswith("seed5")
    monkeypatch.delenv("FARCLUSS_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_benchmark_dir().parent == tmp_path / "xdg" / "farcluss"


def test_split_file_names_are_the_documented_ones(tiny):
    assert SPLIT_FILES == ("labeled.txt", "unlabeled.txt", "val.txt", "train_full.txt")
    assert sorted(path.name for path in (tiny / "splits").iterdir()) == sorted(SPLIT_FILES)
