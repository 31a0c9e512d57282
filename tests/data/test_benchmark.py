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
from farcluss.cli import main
from farcluss.errors import ConfigError, DataError

TINY = dict(num_train=24, num_val=6, num_test=4, progress=False)


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
    assert len(first) == 34 + 34 + 9  # images, masks, classes.txt, 7 split lists, benchmark.json
    assert first == second


def test_different_seed_writes_different_images(tiny, tmp_path):
    other = make_benchmark(tmp_path / "other", seed=4, **TINY)
    first, second = file_hashes(tiny), file_hashes(other)
    assert first["classes.txt"] == second["classes.txt"]
    differing = [name for name in first if name.startswith("images/") and first[name] != second[name]]
    assert len(differing) == 34


def test_train_image_does_not_depend_on_dataset_size(tiny, tmp_path):
    # Each image has its own random stream, so a larger build extends a smaller one.
    larger = make_benchmark(tmp_path / "larger", seed=3, num_train=30, num_val=6, num_test=4, progress=False)
    assert (tiny / "images" / "00007.png").read_bytes() == (larger / "images" / "00007.png").read_bytes()


def test_layout_classes_splits_and_masks(tiny):
    classes = (tiny / "classes.txt").read_text().splitlines()
    assert classes == BENCHMARK_CLASSES
    assert classes[0] == "background" and len(classes) == 9

    labeled = read_split(tiny, "labeled.txt")
    unlabeled = read_split(tiny, "unlabeled.txt")
    train_full = read_split(tiny, "train_full.txt")
    val = read_split(tiny, "val.txt")
    test = read_split(tiny, "test.txt")
    assert len(labeled) == round(24 / 16) == 2
    assert len(unlabeled) == 22 and len(train_full) == 24 and len(val) == 6 and len(test) == 4
    # numbered after the val images
    assert [image for image, _ in test] == [f"images/{i:05d}.png" for i in range(30, 34)]
    labeled_images = {image for image, _ in labeled}
    unlabeled_images = {image for image, _ in unlabeled}
    val_images = {image for image, _ in val}
    assert not labeled_images & unlabeled_images
    assert labeled_images | unlabeled_images == {image for image, _ in train_full}
    assert not val_images & (labeled_images | unlabeled_images)
    assert not {image for image, _ in test} & (val_images | labeled_images | unlabeled_images)

    for image_path, mask_path in train_full + val + test:
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
    assert metadata["counts"] == {"train": 24, "val": 6, "test": 4, "labeled": 2, "unlabeled": 22,
                                  "labeled_half": 1, "unlabeled_half": 23}
    assert metadata["parameters"]["num_test"] == 4
    assert sum(metadata["class_pixel_frequency"]["train"].values()) == pytest.approx(1.0, abs=1e-4)
    # the test statistics are the ones measured from the test masks
    pixels = np.zeros(len(classes), np.int64)
    images = np.zeros(len(classes), np.int64)
    for _, mask_path in test:
        per_class = np.bincount(np.asarray(Image.open(tiny / mask_path)).ravel(), minlength=len(classes))
        pixels += per_class
        images += per_class > 0
    assert [metadata["class_pixel_counts"]["test"][name] for name in classes] == pixels.tolist()
    assert [metadata["class_image_counts"]["test"][name] for name in classes] == images.tolist()


def test_half_label_budget_is_nested_in_the_labeled_split(moderate):
    # 300 train images at 1/16: 19 labeled, the half budget the first 9 of the same draw
    labeled = {image for image, _ in read_split(moderate, "labeled.txt")}
    labeled_half = {image for image, _ in read_split(moderate, "labeled_half.txt")}
    unlabeled_half = {image for image, _ in read_split(moderate, "unlabeled_half.txt")}
    train_full = {image for image, _ in read_split(moderate, "train_full.txt")}
    assert len(labeled) == 19 and len(labeled_half) == 9
    assert labeled_half < labeled
    assert not labeled_half & unlabeled_half and labeled_half | unlabeled_half == train_full
    metadata = json.loads((moderate / "benchmark.json").read_text())
    assert metadata["counts"]["labeled_half"] == 9 and metadata["counts"]["unlabeled_half"] == 291
    # per-class image counts of the half split are the ones its masks hold
    counts = np.zeros(len(BENCHMARK_CLASSES), np.int64)
    for _, mask_path in read_split(moderate, "labeled_half.txt"):
        counts += np.bincount(np.asarray(Image.open(moderate / mask_path)).ravel(),
                              minlength=len(BENCHMARK_CLASSES)) > 0
    assert [metadata["class_image_counts"]["labeled_half"][name] for name in BENCHMARK_CLASSES] == counts.tolist()


def _pixels_digest(folder: Path, names) -> str:
    digest = hashlib.sha256()
    for name in names:
        for sub in ("images", "masks"):
            pixels = np.asarray(Image.open(folder / sub / name))
            digest.update(f"{sub}/{name}{pixels.shape}".encode())
            digest.update(pixels.tobytes())
    return digest.hexdigest()


def test_the_test_split_leaves_train_and_val_as_generator_version_1_wrote_them(tiny, tmp_path):
    # Digests of a version-1 build (seed 3, 24 train, 6 val), written before the test split
    # existed: the pixels of its 30 images and masks (decoded, so a zlib update cannot change
    # them) and the bytes of its four split lists.
    version_1 = {
        "pixels": "808f13955b12c4b3f2c76c138f3bc4b157a4fa41f0d7ed5cec31e9f581016753",
        "labeled.txt": "6289ab751099e70eb67f8d832549134fa73393e3f5b60043061c88d1339673d3",
        "unlabeled.txt": "560e59577fa72a29bce7955f28d6fd3bfa5b8072b64814060034e9279ca34ed2",
        "val.txt": "687cbe043c8011d901cd72fa2c5e27bcc15266a68f85591b9bf358205b2614d5",
        "train_full.txt": "251b37bca27b9281f51d07be01a8a3a08a55c7c6f966765ba4421b1b510f4712",
    }
    other = make_benchmark(tmp_path / "other", seed=3, **{**TINY, "num_test": 7})
    for folder in (tiny, other):
        assert _pixels_digest(folder, [f"{i:05d}.png" for i in range(30)]) == version_1["pixels"]
        for name in ("labeled.txt", "unlabeled.txt", "val.txt", "train_full.txt"):
            assert hashlib.sha256((folder / "splits" / name).read_bytes()).hexdigest() == version_1[name]
    # test images come from their own stream: index i of test is not train or val image i
    image, mask = benchmark._render_sample(3, benchmark._TEST_STREAM, 0, (64, 96))
    assert np.array_equal(np.asarray(Image.open(other / "images" / "00030.png")), image)
    assert np.array_equal(np.asarray(Image.open(other / "masks" / "00030.png")), mask)
    for stream in (benchmark._TRAIN_STREAM, benchmark._VAL_STREAM):
        assert not np.array_equal(benchmark._render_sample(3, stream, 0, (64, 96))[0], image)
    # a larger test split extends a smaller one
    assert file_hashes(other)["images/00033.png"] == file_hashes(tiny)["images/00033.png"]
    assert read_split(other, "test.txt")[:4] == read_split(tiny, "test.txt")


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
        (dict(num_test=0), "num_test"),
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
    assert SPLIT_FILES == ("labeled.txt", "unlabeled.txt", "val.txt", "train_full.txt", "test.txt",
                           "labeled_half.txt", "unlabeled_half.txt")
    assert sorted(path.name for path in (tiny / "splits").iterdir()) == sorted(SPLIT_FILES)


def test_make_benchmark_command_sizes_the_three_splits(tmp_path, capsys):
    from_cli = tmp_path / "cli"
    assert main(["data", "make-benchmark", str(from_cli), "--seed", "2", "--num-train", "4",
                 "--num-val", "2", "--num-test", "3"]) == 0
    counts = json.loads((from_cli / "benchmark.json").read_text())["counts"]
    assert (counts["train"], counts["val"], counts["test"]) == (4, 2, 3)
    assert len(read_split(from_cli, "test.txt")) == 3 and benchmark_is_complete(from_cli)
    assert main(["data", "make-benchmark", str(tmp_path / "bad"), "--num-train", "4",
                 "--num-test", "0"]) == 2
    assert "num_test" in capsys.readouterr().err
