"""The catalogue of bad inputs (issue 6 §4), each through the command line: one line on stderr
naming the file or key, exit code 2, no traceback without --debug, and every file that existed
before the command is unchanged."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_overrides, write_tiny_dataset
from farcluss import cli
from farcluss.config import load_config
from farcluss.diagnose import NOT_LEARNING
from farcluss.engine.checkpoint import save_atomic
from farcluss.errors import DataError
from farcluss.methods import build_method



# labeled samples are 000-003: with batches of 2, four iterations read every one of them
N_LABELED = 4


def _dataset(tmp_path: Path) -> Path:
    root = write_tiny_dataset(tmp_path / "tiny", n_train=6, n_val=2, n_labeled=N_LABELED)
    (root / "config.yaml").write_text("{}\n")
    return root


def _snapshot(folder: Path) -> dict:
    return {path: hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


# ---- ways to break a dataset --------------------------------------------------------------------
def corrupt_image(root: Path) -> str:
    path = root / "images" / "001.png"
    path.write_bytes(b"this is not a PNG file")
    return f"image {path} is not an image (a text file)"


def truncated_png(root: Path) -> str:
    path = root / "images" / "002.png"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return f"image {path} is truncated"


def mask_of_another_size(root: Path) -> str:
    path = root / "masks" / "003.png"
    Image.fromarray(np.zeros((30, 36), np.uint8)).save(path)
    return f"mask size 36x30 != image size 40x40 (width x height) for {root / 'images' / '003.png'} and {path}"


def mask_value_out_of_range(root: Path) -> str:
    path = root / "masks" / "000.png"
    mask = np.array(Image.open(path))
    mask[5, 5] = 7
    Image.fromarray(mask).save(path)
    return f"mask {path} has value 7 outside [0, 3) and != ignore 255"


def rgb_mask(root: Path) -> str:
    path = root / "masks" / "001.png"
    mask = np.array(Image.open(path))
    Image.fromarray(np.stack([mask] * 3, axis=-1)).save(path)
    return f"mask {path} has mode RGB (3 channels)"


def missing_image(root: Path) -> str:
    path = root / "images" / "002.png"
    path.unlink()
    return f"image {path} not found"


def missing_mask(root: Path) -> str:
    path = root / "masks" / "000.png"
    path.unlink()
    return f"mask {path} not found"


def empty_split(root: Path) -> str:
    path = root / "splits" / "labeled.txt"
    path.write_text("# nothing labeled yet\n\n")
    return f"split file {path} lists no samples"


def split_line_with_three_fields(root: Path) -> str:
    path = root / "splits" / "labeled.txt"
    lines = path.read_text().splitlines()
    lines[1] += " extra/field.png"
    path.write_text("\n".join(lines) + "\n")
    return f"{path}:2: expected 'image [mask]', got 3 fields"


def class_file_count_mismatch(root: Path) -> str:
    return f"{root / 'classes.txt'} names 3 classes but num_classes is 4"


@dataclass
class Case:
    name: str
    #: changes the dataset and returns the text the error line must contain
    break_dataset: Optional[Callable[[Path], str]] = None
    overrides: List[str] = field(default_factory=list)
    #: the expected text when no dataset change gives it
    message: str = ""
    #: a lazy error: found while training reads samples, and by `farcluss check` up front
    lazy: bool = False


CATALOGUE = [
    Case("corrupt image", corrupt_image, lazy=True),
    Case("truncated PNG", truncated_png, lazy=True),
    Case("mask of another size", mask_of_another_size, lazy=True),
    Case("mask value >= C", mask_value_out_of_range, lazy=True),
    Case("RGB mask", rgb_mask, lazy=True),
    Case("missing image", missing_image, lazy=True),
    Case("missing mask", missing_mask, lazy=True),
    Case("empty split list", empty_split),
    Case("split line with three fields", split_line_with_three_fields),
    Case("class file count != num_classes", class_file_count_mismatch,
         overrides=["data.num_classes=4"]),
    Case("unknown config key", overrides=["train.lrr=0.1"],
         message="unknown config key 'train.lrr' (did you mean 'train.lr'?)"),
    Case("wrong type", overrides=["train.batch_size=two"],
         message="config key 'train.batch_size' must be int, got 'two'"),
    Case("zero iterations", overrides=["train.iterations=0"],
         message="config key 'train.iterations' must be positive"),
    Case("negative batch size", overrides=["train.batch_size=-2"],
         message="config key 'train.batch_size' must be positive"),
]


def _train_argv(root: Path, out: Path, overrides: List[str], iterations: int = 4) -> List[str]:
    argv = ["train", str(root / "config.yaml"), "--out", str(out)]
    for override in tiny_overrides(root, "farcluss", iterations) + overrides:
        argv += ["--set", override]
    return argv


def _check_argv(root: Path, overrides: List[str]) -> List[str]:
    argv = ["check", str(root / "config.yaml")]
    for override in [f"data.root={root}", *overrides]:
        argv += ["--set", override]
    return argv


def _assert_one_error_line(err: str, expected: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and expected in lines[0]


def _lines_besides_diagnosis(err: str) -> List[str]:
    """stderr lines other than the not-learning line a 1-iteration run may rightly print."""
    return [line for line in err.strip().splitlines() if NOT_LEARNING not in line]


def _run_cli(argv: List[str], capsys) -> tuple:
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _prepared(tmp_path: Path, case: Case) -> tuple:
    root = _dataset(tmp_path)
    expected = case.break_dataset(root) if case.break_dataset else case.message
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("written before the command\n")
    return root, out, expected


@pytest.mark.parametrize("case", CATALOGUE, ids=[case.name for case in CATALOGUE])
def test_training_on_a_bad_input_prints_one_line_and_exits_2(tmp_path, capsys, case):
    root, out, expected = _prepared(tmp_path, case)
    before = _snapshot(tmp_path)

    code, _, err = _run_cli(_train_argv(root, out, case.overrides), capsys)

    assert code == 2
    _assert_one_error_line(err, expected)
    after = _snapshot(tmp_path)
    assert {path: after.get(path) for path in before} == before


@pytest.mark.parametrize("case", CATALOGUE, ids=[case.name for case in CATALOGUE])
def test_check_reports_the_bad_input_and_exits_2(tmp_path, capsys, case):
    root, _, expected = _prepared(tmp_path, case)
    before = _snapshot(tmp_path)

    code, out, err = _run_cli(_check_argv(root, case.overrides), capsys)

    assert code == 2
    if case.lazy:
        # `check` reads every file and lists each problem on stdout, the count on stderr
        assert any(line.startswith(f"  {expected}") for line in out.splitlines()), out
        assert err.strip().splitlines() == ["1 problem(s) found"]
    else:
        _assert_one_error_line(err, expected)
    assert _snapshot(tmp_path) == before


def test_check_lists_every_problem_at_once(tmp_path, capsys):
    root = _dataset(tmp_path)
    expected = [corrupt_image(root), mask_value_out_of_range(root), mask_of_another_size(root)]
    code, out, err = _run_cli(_check_argv(root, []), capsys)
    assert code == 2
    problems = [line.strip() for line in out.splitlines() if line.startswith("  ")]
    assert len(problems) == 3
    for text in expected:
        assert sum(problem.startswith(text) for problem in problems) == 1, text
    assert "labeled: 4 samples, 3 problem(s)" in out
    assert err.strip() == "3 problem(s) found"


def test_check_of_a_clean_dataset_exits_0(tmp_path, capsys):
    root = _dataset(tmp_path)
    code, out, err = _run_cli(_check_argv(root, []), capsys)
    assert code == 0 and "no problems found" in out and err == ""


def test_a_bad_file_read_in_a_dataloader_worker_is_the_same_one_line(tmp_path, capsys):
    root = _dataset(tmp_path)
    expected = corrupt_image(root)
    code, _, err = _run_cli(_train_argv(root, tmp_path / "run", ["train.num_workers=1"]), capsys)
    assert code == 2
    _assert_one_error_line(err, expected)


def test_debug_shows_the_traceback(tmp_path):
    root = _dataset(tmp_path)
    corrupt_image(root)
    with pytest.raises(DataError, match="is not an image"):
        cli.main(["--debug", *_train_argv(root, tmp_path / "run", [])])


@pytest.mark.slow
def test_a_real_process_exits_2_without_a_traceback(tmp_path):
    root = _dataset(tmp_path)
    expected = corrupt_image(root)
    env = dict(os.environ, KMP_BLOCKTIME="0", OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-m", "farcluss", *_train_argv(root, tmp_path / "run", ["train.num_workers=1"])],
        env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    _assert_one_error_line(done.stderr, expected)


def test_output_folder_that_cannot_be_created_is_one_line(tmp_path, capsys):
    # a path under a regular file cannot become a folder, even for root (chmod would not stop it)
    root = _dataset(tmp_path)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder\n")
    before = _snapshot(tmp_path)
    code, _, err = _run_cli(_train_argv(root, blocker / "run", []), capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"error: output folder {blocker / 'run'} is not writable")
    assert "Not a directory" in lines[0]
    assert _snapshot(tmp_path) == before


def test_checkpoint_of_a_model_with_other_classes_names_the_shape_mismatch(tmp_path, capsys):
    root = _dataset(tmp_path)
    five = ["a", "b", "c", "d", "e"]
    other_cfg = load_config(overrides=tiny_overrides(root) + [f"data.classes=[{', '.join(five)}]"])
    model = build_method(other_cfg, len(five)).build_student()
    checkpoint = tmp_path / "five_classes.pt"
    save_atomic({"config": other_cfg.to_dict(), "classes": five, "student": model.state_dict(),
                 "teacher": model.state_dict()}, checkpoint)
    before = _snapshot(tmp_path)

    argv = ["eval", str(root / "config.yaml"), "--checkpoint", str(checkpoint)]
    for override in tiny_overrides(root):
        argv += ["--set", override]
    code, _, err = _run_cli(argv, capsys)

    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert f"checkpoint {checkpoint} does not fit the model (shape mismatch)" in lines[0]
    assert "checkpoint (5, " in lines[0] and "vs model (3, " in lines[0]
    assert _snapshot(tmp_path) == before


# ---- inputs that are accepted ---------------------------------------------------------------------
def test_image_in_both_labeled_and_unlabeled_lists_warns_and_trains(tmp_path, capsys):
    root = _dataset(tmp_path)
    labeled_line = (root / "splits" / "labeled.txt").read_text().splitlines()[0]
    with open(root / "splits" / "unlabeled.txt", "a") as handle:
        handle.write(labeled_line.split()[0] + "\n")
    code, out, err = _run_cli(_train_argv(root, tmp_path / "run", [], iterations=1), capsys)
    assert code == 0, err
    assert _lines_besides_diagnosis(err) == [
        f"warning: 1 image(s) are in both splits/labeled.txt and splits/unlabeled.txt, "
        f"e.g. {root / 'images' / '000.png'}"]
    assert "best mIoU" in out


def test_crop_larger_than_every_image_pads_instead_of_failing(tmp_path, capsys):
    root = _dataset(tmp_path)
    code, out, err = _run_cli(_train_argv(root, tmp_path / "run", ["data.crop_size=64"],
                                          iterations=1), capsys)
    assert code == 0, err
    assert _lines_besides_diagnosis(err) == []
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert last["iteration"] == 1
