import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from farcluss.data.cityscapes import CITYSCAPES_CLASSES
from farcluss.data.datasets import VOC_CLASSES, SegmentationDataset, read_classes, resolve_preset
from farcluss.data.sampler import InfiniteSampler
from farcluss.data.splits import Sample
from farcluss.data.transforms import EvalTransform, WeakAugment
from farcluss.errors import ConfigError, DataError


def make_sample(tmp_path, name, size=(20, 16), mask_size=None, mask_value=1, noise_seed=None):
    width, height = size
    image_path = tmp_path / f"{name}.jpg"
    mask_path = tmp_path / f"{name}_mask.png"
    if noise_seed is None:
        Image.new("RGB", size, (10, 20, 30)).save(image_path)
    else:
        image_path = image_path.with_suffix(".png")  # lossless, so crops differ only by position
        noise = np.random.default_rng(noise_seed)
        pixels = noise.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(image_path)
    mask_width, mask_height = mask_size or size
    Image.fromarray(np.full((mask_height, mask_width), mask_value, dtype=np.uint8)).save(mask_path)
    return Sample(image_path, mask_path)


def test_labeled_unlabeled_and_val_items(tmp_path):
    samples = [make_sample(tmp_path, "a"), make_sample(tmp_path, "b")]
    weak = WeakAugment(crop_size=12)
    labeled = SegmentationDataset(samples, 3, 255, weak, "labeled")
    item = labeled[(1, 42)]
    assert set(item) == {"image", "mask", "name"} and item["name"] == "b"
    assert item["image"].shape == (3, 12, 12) and item["mask"].shape == (12, 12)
    assert set(item["mask"].unique().tolist()) <= {1, 255}

    unlabeled = SegmentationDataset([Sample(samples[0].image)], 3, 255, weak, "unlabeled")
    item = unlabeled[(0, 42)]
    assert set(item) == {"image", "ignore_mask", "name"}

    val = SegmentationDataset(samples, 3, 255, EvalTransform(), "val")
    item = val[0]
    assert item["image"].shape == (3, 16, 20) and torch.all(item["mask"] == 1)


def test_augmentation_depends_only_on_the_carried_seed(tmp_path):
    samples = [make_sample(tmp_path, f"s{i}", size=(24, 20), noise_seed=i) for i in range(3)]
    dataset = SegmentationDataset(samples, 3, 255, WeakAugment(crop_size=16), "labeled")
    assert torch.equal(dataset[(2, 5)]["image"], dataset[(2, 5)]["image"])
    assert not torch.equal(dataset[(2, 5)]["image"], dataset[(2, 6)]["image"])


def test_dataloader_with_infinite_sampler_resumes_exactly(tmp_path):
    samples = [make_sample(tmp_path, f"s{i}", mask_value=i % 3) for i in range(5)]
    dataset = SegmentationDataset(samples, 3, 255, WeakAugment(crop_size=8), "labeled")

    def batches(start, count):
        sampler = InfiniteSampler(len(dataset), seed=3, start=start)
        loader = DataLoader(dataset, batch_size=2, sampler=sampler)
        stream = iter(loader)
        return [next(stream) for _ in range(count)]

    full = batches(0, 4)
    resumed = batches(4, 2)  # 2 batches of 2 already consumed
    for expected, actual in zip(full[2:], resumed):
        assert expected["name"] == actual["name"]
        assert torch.equal(expected["image"], actual["image"])
        assert torch.equal(expected["mask"], actual["mask"])


def test_size_mismatch_and_bad_values_raise_on_load(tmp_path):
    mismatched = make_sample(tmp_path, "m", size=(12, 10), mask_size=(10, 12))
    dataset = SegmentationDataset([mismatched], 3, 255, EvalTransform(), "val")
    with pytest.raises(DataError, match=r"mask size 10x12 != image size 12x10"):
        dataset[0]
    out_of_range = make_sample(tmp_path, "v", mask_value=7)
    dataset = SegmentationDataset([out_of_range], 3, 255, EvalTransform(), "val")
    with pytest.raises(DataError, match=r"v_mask\.png has value 7 outside \[0, 3\)"):
        dataset[0]


def test_unlabeled_mode_never_reads_the_mask(tmp_path):
    sample = make_sample(tmp_path, "u", mask_value=99)  # invalid for 3 classes
    dataset = SegmentationDataset([sample], 3, 255, WeakAugment(crop_size=8), "unlabeled")
    assert dataset[(0, 1)]["image"].shape == (3, 8, 8)


def test_labeled_mode_requires_masks(tmp_path):
    with pytest.raises(DataError, match="labeled sample .*x.jpg has no mask"):
        SegmentationDataset([Sample(tmp_path / "x.jpg")], 3, 255, WeakAugment(8), "labeled")


def test_read_classes_from_file_and_count_check(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("background\nroad\n\ncar\n")
    assert read_classes(path) == ["background", "road", "car"]
    assert read_classes(path, num_classes=3) == ["background", "road", "car"]
    with pytest.raises(DataError, match=r"classes\.txt names 3 classes but num_classes is 4"):
        read_classes(path, num_classes=4)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match=r"empty\.txt names no classes"):
        read_classes(empty)
    with pytest.raises(DataError, match="repeats the class name 'car'"):
        read_classes(["car", "road", "car"])


def test_presets(tmp_path):
    (tmp_path / "classes.txt").write_text("bg\nfg\n")
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "labeled.txt").write_text("images/a.png masks/a.png\n")
    spec = resolve_preset("folder", tmp_path)
    assert spec.classes == ("bg", "fg") and spec.num_classes == 2

    voc = resolve_preset("voc", tmp_path)
    assert voc.num_classes == 21 and voc.classes[0] == "background" and voc.classes == VOC_CLASSES
    assert resolve_preset("voc_blended", tmp_path).classes == VOC_CLASSES
    cityscapes = resolve_preset("cityscapes", tmp_path)
    assert cityscapes.num_classes == 19 and cityscapes.classes == CITYSCAPES_CLASSES
    assert cityscapes.classes[13] == "car"

    with pytest.raises(ConfigError, match="unknown dataset preset 'coco'"):
        resolve_preset("coco", tmp_path)
    with pytest.raises(DataError, match="dataset root .* not found"):
        resolve_preset("voc", tmp_path / "missing")
    with pytest.raises(DataError, match=r"class list .*classes\.txt not found"):
        resolve_preset("folder", tmp_path / "splits")
