"""`farcluss data cityscapes` on a miniature Cityscapes tree, then the recipe's own check of it
with split lists in UniMatch's format (as docs/reproduce.md prepares them)."""

from pathlib import Path

import numpy as np
from PIL import Image

from farcluss.cli import main

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "cityscapes" / "1_16_r101.yaml"


def _write_city(root: Path, split: str, stem: str, label_ids: np.ndarray) -> str:
    image = root / "leftImg8bit" / split / "aachen" / f"{stem}_leftImg8bit.png"
    labels = root / "gtFine" / split / "aachen" / f"{stem}_gtFine_labelIds.png"
    image.parent.mkdir(parents=True, exist_ok=True)
    labels.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", label_ids.shape[::-1], (90, 90, 90)).save(image)
    Image.fromarray(label_ids).save(labels)
    train_ids = labels.name.replace("_labelIds.png", "_labelTrainIds.png")
    return f"{image.relative_to(root)} {labels.parent.relative_to(root)}/{train_ids}"


def test_converter_command_then_recipe_check(tmp_path, capsys):
    # label ids: road 7 → 0, car 26 → 13, unlabeled 0 and license plate 34+ → 255
    label_ids = np.array([[7, 26, 0], [11, 33, 40]], dtype=np.uint8)
    lines = [_write_city(tmp_path, "train", f"aachen_00000{i}_000019", label_ids) for i in range(3)]

    assert main(["data", "cityscapes", str(tmp_path)]) == 0
    assert "wrote 3 *_labelTrainIds.png files" in capsys.readouterr().out
    converted = tmp_path / lines[0].split()[1]
    np.testing.assert_array_equal(np.asarray(Image.open(converted)), [[0, 13, 255], [2, 18, 255]])

    lists = tmp_path / "splits" / "cityscapes"
    (lists / "1_16").mkdir(parents=True)
    (lists / "1_16" / "labeled.txt").write_text(lines[0] + "\n")
    (lists / "1_16" / "unlabeled.txt").write_text("\n".join(lines[1:]) + "\n")
    (lists / "val.txt").write_text(lines[2] + "\n")
    assert main(["check", str(RECIPE), "--set", f"data.root={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "labeled: 1 samples, 0 problem(s)" in out and "no problems found" in out
