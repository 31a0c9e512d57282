import numpy as np
import pytest
from PIL import Image

from farcluss.data.io import load_mask
from farcluss.errors import DataError
from farcluss.palette import (
    IGNORE_COLOUR, class_colours, colorize, distinct_colours, legend, overlay, png_palette,
    save_index_png, voc_colours,
)


def test_voc_colour_map_matches_known_entries():
    colours = voc_colours(21)
    assert colours[0].tolist() == [0, 0, 0]           # background
    assert colours[1].tolist() == [128, 0, 0]         # aeroplane
    assert colours[2].tolist() == [0, 128, 0]         # bicycle
    assert colours[4].tolist() == [0, 0, 128]         # boat
    assert colours[8].tolist() == [64, 0, 0]          # cat: bit 3 → red's second bit
    assert colours[15].tolist() == [192, 128, 128]    # person
    assert colours[20].tolist() == [0, 64, 128]       # tvmonitor


def test_palette_is_chosen_by_class_count():
    assert np.array_equal(class_colours(21), voc_colours(21))
    cityscapes = class_colours(19)
    assert cityscapes[0].tolist() == [128, 64, 128]   # road
    assert cityscapes[10].tolist() == [70, 130, 180]  # sky
    assert cityscapes[18].tolist() == [119, 11, 32]   # bicycle
    assert np.array_equal(class_colours(5), distinct_colours(5))


def test_generated_palette_is_deterministic_and_distinct():
    first, second = distinct_colours(60), distinct_colours(60)
    assert np.array_equal(first, second)
    assert len({tuple(colour) for colour in first.tolist()}) == 60
    # a prefix does not depend on how many colours were asked for
    assert np.array_equal(distinct_colours(7), first[:7])


def test_palette_png_decodes_to_the_indices(tmp_path):
    rng = np.random.default_rng(0)
    indices = rng.integers(0, 7, size=(13, 17)).astype(np.uint8)
    indices[0, 0] = 255
    path = tmp_path / "pred.png"
    save_index_png(path, indices, num_classes=7)
    with Image.open(path) as image:
        assert image.mode == "P"
        decoded = np.array(image)
        palette = np.array(image.getpalette()[:768]).reshape(256, 3)
    assert np.array_equal(decoded, indices)
    assert np.array_equal(palette[:7], distinct_colours(7))
    assert tuple(palette[255]) == IGNORE_COLOUR
    # the prediction is a valid mask for training (e.g. as pseudo-labels)
    assert np.array_equal(load_mask(path, num_classes=7), indices)


def test_colorize_and_overlay_blend_by_alpha():
    indices = np.array([[0, 1], [15, 255]])
    colours = colorize(indices, 21)
    assert colours[0, 1].tolist() == [128, 0, 0]
    assert colours[1, 1].tolist() == list(IGNORE_COLOUR)
    image = Image.new("RGB", (2, 2), (100, 100, 100))
    blended = np.array(overlay(image, indices, 21, alpha=0.5))
    # 0.5 · 100 + 0.5 · (128, 0, 0) = (114, 50, 50); person (192, 128, 128) → (146, 114, 114)
    assert blended[0, 1].tolist() == [114, 50, 50]
    assert blended[1, 0].tolist() == [146, 114, 114]
    assert np.array(overlay(image, indices, 21, alpha=0.0))[0, 1].tolist() == [100, 100, 100]


def test_bad_inputs_are_refused():
    with pytest.raises(DataError, match="300 classes"):
        class_colours(300)
    with pytest.raises(ValueError, match="H×W"):
        colorize(np.zeros((2, 2, 2), np.int64), 3)
    with pytest.raises(ValueError, match="0..255"):
        colorize(np.array([[256]]), 3)
    with pytest.raises(ValueError, match="differ in size"):
        overlay(Image.new("RGB", (3, 2)), np.zeros((2, 2), np.int64), 3)


def test_legend_lists_index_name_and_colour():
    lines = legend(["road", "sidewalk"] + [f"c{i}" for i in range(17)]).splitlines()
    assert lines[0] == "0\troad\t#804080"
    assert len(lines) == 19
    assert png_palette(19)[1].tolist() == [244, 35, 232]
