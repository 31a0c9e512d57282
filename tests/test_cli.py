"""The `farcluss` command line end to end: train then eval on a folder dataset given by --set
keys alone, --version, and split lists made from a folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import farcluss
from conftest import TINY_CLASSES, tiny_overrides, write_tiny_dataset
from farcluss import cli
from farcluss.data.splits import read_split




def _sets(overrides: list) -> list:
    argv = []
    for override in overrides:
        argv += ["--set", override]
    return argv


def test_train_then_eval_json_with_set_keys_only(tmp_path, capsys):
    root = write_tiny_dataset(tmp_path / "tiny", n_train=6, n_val=2)
    run = tmp_path / "run"
    overrides = tiny_overrides(root, "fixmatch", 2)

    assert cli.main(["train", *_sets(overrides), "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert "teacher: mIoU" in out and f"run folder {run}" in out

    checkpoint = run / "checkpoints" / "last.pt"
    assert cli.main(["eval", *_sets(overrides), "--checkpoint", str(checkpoint), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["class_names"] == TINY_CLASSES
    assert len(result["per_class_iou"]) == len(TINY_CLASSES)
    # the final evaluation of the run saw the same teacher on the same images
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    final_teacher = [r for r in logged if r["type"] == "eval" and r["model"] == "teacher"][-1]
    assert result["miou"] == pytest.approx(final_teacher["miou"])
    assert result["per_class_iou"] == pytest.approx(final_teacher["per_class_iou"])
    assert result["confused_with"] == final_teacher["confused_with"]
    # the table names, per class, where its wrong pixels went
    assert cli.main(["eval", *_sets(overrides), "--checkpoint", str(checkpoint)]) == 0
    table = capsys.readouterr().out
    for name, mistake in zip(TINY_CLASSES, result["confused_with"]):
        if mistake is not None:
            assert f"{mistake[1]:4.1f} % of its pixels predicted as {mistake[0]}" in table


def test_train_reports_the_test_split_and_eval_scores_it_on_request(tmp_path, capsys):
    root = write_tiny_dataset(tmp_path / "tiny", n_train=6, n_val=2, n_test=3)
    run = tmp_path / "run"
    overrides = tiny_overrides(root, "fixmatch", 2) + ["data.test=splits/test.txt"]
    assert cli.main(["train", *_sets(overrides), "--out", str(run)]) == 0
    assert "teacher (test): mIoU" in capsys.readouterr().out

    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    final_teacher = [r for r in logged if r["type"] == "eval" and r["model"] == "teacher"][-1]
    checkpoint = str(run / "checkpoints" / "last.pt")
    results = {}
    for split in ("val", "test"):
        assert cli.main(["eval", *_sets(overrides), "--checkpoint", checkpoint, "--json",
                         "--split", split]) == 0
        results[split] = json.loads(capsys.readouterr().out)
        assert results[split]["split"] == split
    assert results["test"]["miou"] == pytest.approx(final_teacher["test_miou"])
    assert results["test"]["per_class_iou"] == pytest.approx(final_teacher["test_per_class_iou"])
    assert results["val"]["miou"] == pytest.approx(final_teacher["miou"])
    # no data.test: --split test is a one-line error naming the key
    assert cli.main(["eval", *_sets(overrides[:-1]), "--checkpoint", checkpoint,
                     "--split", "test"]) == 2
    assert "'data.test' is not set" in capsys.readouterr().err


def test_version_through_python_dash_m():
    done = subprocess.run([sys.executable, "-m", "farcluss", "--version"], capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, KMP_BLOCKTIME="0"))
    assert done.returncode == 0
    assert done.stdout.strip() == f"farcluss {farcluss.__version__}"


def test_splits_from_a_folder_writes_the_three_lists(tmp_path, capsys):
    root = write_tiny_dataset(tmp_path / "tiny", n_train=8, n_val=2)
    out = tmp_path / "splits"
    code = cli.main(["splits", "--folder", str(root), "--labeled", "3", "--val", "2",
                     "--seed", "1", "--out", str(out)])
    assert code == 0
    labeled = read_split(out / "labeled.txt", root, require_mask=True)
    unlabeled = read_split(out / "unlabeled.txt", root, require_mask=False)
    val = read_split(out / "val.txt", root, require_mask=True)
    assert (len(labeled), len(val), len(unlabeled)) == (3, 2, 5)
    images = [sample.image for sample in labeled + unlabeled + val]
    assert sorted(images) == sorted((root / "images").iterdir())
    assert all(sample.mask == root / "masks" / sample.image.name for sample in labeled + val)
    printed = capsys.readouterr().out
    assert f"labeled: 3 samples → {out / 'labeled.txt'}" in printed
