import numpy as np
import pytest
from PIL import Image

from farcluss.data.io import check_same_size, load_image, load_mask
from farcluss.errors import DataError


def save_png(path, array):
    Image.fromarray(array).save(path)
    return path


def test_load_image_converts_to_rgb(tmp_path):
    grey = save_png(tmp_path / "grey.png", np.full((5, 7), 200, dtype=np.uint8))
    image = load_image(grey)
    assert image.mode == "RGB" and image.size == (7, 5)
    assert np.asarray(image)[0, 0].tolist() == [200, 200, 200]


def test_missing_image_is_named(tmp_path):
    with pytest.raises(DataError, match=r"image .*absent\.png not found"):
        load_image(tmp_path / "absent.png")


def test_truncated_png_is_named(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    whole = save_png(tmp_path / "whole.png", noise).read_bytes()
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=r"image .*truncated\.png is truncated$"):
        load_image(truncated)


def test_non_image_file_is_named(tmp_path):
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image at all")
    with pytest.raises(DataError, match=r"image .*junk\.jpg is not an image \(a text file\)$"):
        load_image(junk)


def test_palette_mask_uses_indices_not_colours(tmp_path):
    indices = np.array([[0, 1, 20], [255, 3, 0]], dtype=np.uint8)
    path = tmp_path / "voc.png"
    image = Image.frombytes("P", (3, 2), indices.tobytes())
    image.putpalette([(7 * i) % 256 for i in range(768)])  # colours unrelated to the indices
    image.save(path)
    assert Image.open(path).mode == "P"
    mask = load_mask(path, num_classes=21)
    assert mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, indices)


def test_grey_and_16_bit_masks_are_accepted(tmp_path):
    grey = np.array([[0, 4], [255, 2]], dtype=np.uint8)
    np.testing.assert_array_equal(load_mask(save_png(tmp_path / "l.png", grey), 5), grey)
    wide = np.array([[0, 300], [255, 2]], dtype=np.uint16)
    path = save_png(tmp_path / "i16.png", wide)
    assert Image.open(path).mode == "I;16"
    mask = load_mask(path, num_classes=301, ignore_index=255)
    assert mask.dtype == np.int64
    np.testing.assert_array_equal(mask, wide)


def test_rgb_mask_is_refused(tmp_path):
    path = save_png(tmp_path / "colour.png", np.zeros((4, 4, 3), dtype=np.uint8))
    with pytest.raises(DataError, match=r"mask .*colour\.png has mode RGB \(3 channels\)"):
        load_mask(path, num_classes=21)


def test_out_of_range_value_is_named(tmp_path):
    path = save_png(tmp_path / "x.png", np.array([[0, 37], [255, 40]], dtype=np.uint8))
    with pytest.raises(DataError) as raised:
        load_mask(path, num_classes=21)
    assert f"mask {path} has value 37 outside [0, 21) and != ignore 255" in str(raised.value)
    assert str(raised.value).endswith("(and 1 more)")


def test_ignore_value_is_configurable(tmp_path):
    path = save_png(tmp_path / "m.png", np.array([[0, 250]], dtype=np.uint8))
    np.testing.assert_array_equal(load_mask(path, num_classes=2, ignore_index=250), [[0, 250]])
    with pytest.raises(DataError, match="value 250 outside"):
        load_mask(path, num_classes=2, ignore_index=255)


def test_size_mismatch_names_both_sizes(tmp_path):
    image = Image.new("RGB", (12, 10))
    check_same_size(image, np.zeros((10, 12), dtype=np.uint8), "a.jpg", "a.png")
    message = r"mask size 10x12 != image size 12x10 .* for a\.jpg and a\.png"
    with pytest.raises(DataError, match=message):
        check_same_size(image, np.zeros((12, 10), dtype=np.uint8), "a.jpg", "a.png")
