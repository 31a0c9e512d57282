import numpy as np
from PIL import Image

from farcluss.data.check import check_samples
from farcluss.data.splits import Sample


def save(path, array):
    Image.fromarray(array).save(path)
    return path


def test_check_collects_one_line_per_problem(tmp_path):
    image = save(tmp_path / "ok.png", np.zeros((6, 8, 3), dtype=np.uint8))
    good_mask = save(tmp_path / "ok_mask.png", np.ones((6, 8), dtype=np.uint8))
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(image.read_bytes()[:40])
    rgb_mask = save(tmp_path / "rgb_mask.png", np.zeros((6, 8, 3), dtype=np.uint8))
    wide_mask = save(tmp_path / "wide_mask.png", np.ones((6, 9), dtype=np.uint8))
    bad_value = save(tmp_path / "value_mask.png", np.full((6, 8), 9, dtype=np.uint8))
    samples = [
        Sample(image, good_mask),
        Sample(truncated, good_mask),
        Sample(tmp_path / "absent.png", good_mask),
        Sample(image, rgb_mask),
        Sample(image, wide_mask),
        Sample(image, bad_value),
        Sample(image, None),
    ]
    problems = check_samples(samples, num_classes=3, ignore_index=255, require_mask=True)
    assert len(problems) == 6
    assert all("\n" not in problem for problem in problems)
    assert "cut.png is truncated or corrupt" in problems[0]
    assert "absent.png not found" in problems[1]
    assert "rgb_mask.png has mode RGB" in problems[2]
    assert "mask size 9x6 != image size 8x6" in problems[3]
    assert "value_mask.png has value 9 outside [0, 3)" in problems[4]
    assert "has no mask" in problems[5]


def test_unlabeled_check_reads_images_only(tmp_path):
    image = save(tmp_path / "ok.png", np.zeros((6, 8, 3), dtype=np.uint8))
    samples = [Sample(image, tmp_path / "missing_mask.png"), Sample(image, None)]
    assert check_samples(samples, num_classes=3, ignore_index=255, require_mask=False) == []
    problems = check_samples([Sample(tmp_path / "gone.jpg")], 3, 255, require_mask=False)
    assert len(problems) == 1 and "gone.jpg not found" in problems[0]
