"""Atomic writes, safe loads (a code-executing pickle is refused by every loading path) and the
random-number state carried by checkpoints."""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import tiny_overrides, write_tiny_dataset
from farcluss import cli
from farcluss.config import load_config
from farcluss.engine import checkpoint as ckpt
from farcluss.errors import CheckpointError




# ---- atomic writes ----------------------------------------------------------------------------
def _temporaries(folder: Path) -> list:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_save_atomic_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "checkpoints" / "last.pt"
    ckpt.save_atomic({"iteration": 1, "weight": torch.ones(3)}, path)
    ckpt.save_atomic({"iteration": 2, "weight": torch.zeros(3)}, path)
    state = ckpt.load_checkpoint(path)
    assert state["iteration"] == 2 and torch.equal(state["weight"], torch.zeros(3))
    assert _temporaries(path.parent) == []
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_write_that_fails_midway_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ckpt.save_atomic({"iteration": 1}, path)
    before = path.read_bytes()
    seen = []

    def fail_midway(tmp_path_in_write: Path) -> None:
        seen.append(tmp_path_in_write)
        assert tmp_path_in_write.parent == path.parent and tmp_path_in_write.is_file()
        raise RuntimeError("disk pulled out")

    monkeypatch.setattr(ckpt, "_write_hook", fail_midway)
    with pytest.raises(RuntimeError, match="disk pulled out"):
        ckpt.save_atomic({"iteration": 2}, path)
    assert path.read_bytes() == before
    assert ckpt.load_checkpoint(path)["iteration"] == 1
    assert len(seen) == 1 and not seen[0].exists()


def test_save_atomic_into_an_unwritable_place_names_the_path(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*a_file/ck/last\.pt"):
        ckpt.save_atomic({"iteration": 1}, blocker / "ck" / "last.pt")


def test_remove_stale_temporaries_only_removes_killed_writes(tmp_path):
    (tmp_path / "last.pt").write_bytes(b"keep")
    (tmp_path / ".last.pt.123.0a1b2c3d.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / "notes.tmp").write_text("not hidden: not ours")
    removed = ckpt.remove_stale_temporaries(tmp_path)
    assert [p.name for p in removed] == [".last.pt.123.0a1b2c3d.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "notes.tmp"]
    assert ckpt.remove_stale_temporaries(tmp_path / "missing") == []


# ---- loading errors -----------------------------------------------------------------------------
def test_unreadable_checkpoints_are_one_line_errors(tmp_path):
    good = tmp_path / "good.pt"
    ckpt.save_atomic({"weight": torch.arange(1000.0)}, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = tmp_path / "text.pt"
    text.write_text("hello\n")
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.ones(2), tensor)

    for path, message in [(tmp_path / "missing.pt", "checkpoint not found"),
                          (truncated, "is truncated"),
                          (text, "is a text file, not a farcluss checkpoint"),
                          (tensor, "holds a Tensor, not a dict")]:
        with pytest.raises(CheckpointError) as info:
            ckpt.load_checkpoint(path)
        assert message in str(info.value) and str(path) in str(info.value)
        assert "\n" not in str(info.value)


def test_load_model_state_names_shape_mismatches_and_missing_keys():
    three_classes = nn.Sequential(nn.Conv2d(4, 3, 1))
    five_classes = nn.Sequential(nn.Conv2d(4, 5, 1))
    with pytest.raises(CheckpointError, match=r"shape mismatch.*0\.weight: checkpoint \(5, 4, 1, 1\) "
                                              r"vs model \(3, 4, 1, 1\)"):
        ckpt.load_model_state(three_classes, five_classes.state_dict(), "other.pt")
    with pytest.raises(CheckpointError, match=r"missing 0\.bias; unexpected extra"):
        state = dict(three_classes.state_dict())
        state["extra"] = state.pop("0.bias")
        ckpt.load_model_state(three_classes, state, "other.pt")
    ckpt.load_model_state(three_classes, {k: v * 0 for k, v in three_classes.state_dict().items()}, "ok")
    assert all(bool((p == 0).all()) for p in three_classes.parameters())


# ---- random-number state ------------------------------------------------------------------------
def _draws() -> tuple:
    return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(),
            np.random.normal(size=3).tolist(), torch.rand(3).tolist())


def test_rng_state_survives_a_weights_only_checkpoint(tmp_path):
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    # leave cached Gaussians behind: half of a Box-Muller pair is part of the state
    random.gauss(0, 1)
    np.random.normal()
    ckpt.save_atomic({"rng": ckpt.capture_rng_state()}, tmp_path / "rng.pt")
    expected = _draws()
    _draws()  # move every generator on
    ckpt.restore_rng_state(ckpt.load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert _draws() == expected


# ---- a code-executing pickle is refused everywhere ----------------------------------------------
class _Payload:
    """Unpickling this writes a marker file: what an attacker's checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",)


def _write_payload(path: Path, marker: Path, fmt: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"iteration": 3, "student": {"weight": torch.ones(1)}, "config": _Payload(marker)}
    if fmt == "torch":
        torch.save(state, path)
    else:
        with open(path, "wb") as handle:
            pickle.dump(state, handle)
    return path


@pytest.mark.parametrize("fmt", ["torch", "pickle"])
def test_the_payload_would_run_code_if_it_were_unpickled(tmp_path, fmt):
    marker = tmp_path / "marker"
    path = _write_payload(tmp_path / "evil.pt", marker, fmt)
    # what the loaders must never do
    if fmt == "torch":
        torch.load(path, weights_only=False)
    else:
        with open(path, "rb") as handle:
            pickle.load(handle)
    assert marker.read_text() == "code ran"


@pytest.fixture(scope="module")
def payload_setup(tmp_path_factory):
    root = write_tiny_dataset(tmp_path_factory.mktemp("payload") / "tiny", n_train=6, n_val=2)
    config = root / "config.yaml"
    config.write_text("{}\n")
    return root, config


def _cli_args(command: str, root: Path, config: Path, evil: Path, tmp_path: Path) -> list:
    sets = []
    for override in tiny_overrides(root, "farcluss", 2):
        sets += ["--set", override]
    if command == "eval":
        return ["eval", str(config), *sets, "--checkpoint", str(evil)]
    if command == "train-resume":
        return ["train", str(config), *sets, "--out", str(evil.parent.parent), "--resume"]
    if command == "train-pretrained":
        return ["train", str(config), *sets, "--set", f"model.pretrained={evil}",
                "--out", str(tmp_path / "run")]
    if command == "predict":
        return ["predict", str(root / "images" / "000.png"), "--checkpoint", str(evil),
                "--out", str(tmp_path / "predictions")]
    if command == "export":
        return ["export", "--checkpoint", str(evil), "--out", str(tmp_path / "model.onnx")]
    if command == "report":
        run = evil.parent.parent
        (run / "config.yaml").write_text(f"data: {{root: {root}}}\n")
        (run / "metrics.jsonl").write_text(
            '{"type": "train", "iteration": 1, "lr": 0.01, "loss": 1.0, "loss_sup": 1.0}\n'
            '{"type": "eval", "iteration": 1, "model": "teacher", "miou": 10.0, '
            '"per_class_iou": [10.0, 10.0, 10.0], "pixel_accuracy": 50.0}\n')
        return ["report", str(run), "--out", str(tmp_path / "report")]
    raise AssertionError(command)


CLI_LOADING_PATHS = ["eval", "train-resume", "train-pretrained", "predict", "export", "report"]


@pytest.mark.parametrize("fmt", ["torch", "pickle"])
@pytest.mark.parametrize("command", CLI_LOADING_PATHS)
def test_every_cli_loading_path_refuses_the_payload(payload_setup, tmp_path, capsys, command, fmt):
    root, config = payload_setup
    marker = tmp_path / "marker"
    evil = _write_payload(tmp_path / "run" / "checkpoints" / "last.pt", marker, fmt)
    # a loader must refuse before anything else could go wrong
    (tmp_path / "run" / "checkpoints" / "best.pt").write_bytes(evil.read_bytes())
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}

    code = cli.main(_cli_args(command, root, config, evil, tmp_path))

    assert not marker.exists(), f"{command} ran the payload's code"
    refusals = [line for line in capsys.readouterr().err.splitlines() if "refusing to load" in line]
    assert len(refusals) == 1
    assert "/run/checkpoints/" in refusals[0] and "not a plain tensor checkpoint" in refusals[0]
    if command != "report":  # a report skips the parts it cannot load, with a warning
        assert code == 2 and refusals[0].startswith("error: ")
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()
            if p in before} == before


@pytest.mark.parametrize("fmt", ["torch", "pickle"])
def test_library_loaders_refuse_the_payload(payload_setup, tmp_path, fmt):
    from farcluss.inference import load_trained_model
    from farcluss.methods import build_method
    from farcluss.models.pretrained import load_pretrained

    root, _ = payload_setup
    marker = tmp_path / "marker"
    evil = _write_payload(tmp_path / "evil.pt", marker, fmt)
    with pytest.raises(CheckpointError, match=f"refusing to load {evil}"):
        ckpt.load_checkpoint(evil)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_trained_model(evil)
    model = build_method(load_config(overrides=tiny_overrides(root)), 3).build_student()
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_pretrained(model, evil)
    assert not marker.exists()
