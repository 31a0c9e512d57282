"""A full disk (issue 17): a checkpoint or log write that fails ends the run with one line naming
the file and the OS error, exit 2, the previous last.pt / best.pt / metrics.jsonl unchanged and
no temporary file left. The failure is a patched writer that raises the OS error part-way."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pytest
import torch

from conftest import tiny_overrides, write_tiny_dataset
from farcluss import cli
from farcluss.engine import checkpoint as ckpt
from farcluss.errors import CheckpointError

ERRORS = [errno.ENOSPC, errno.EIO, errno.EACCES]
CODE_NAMES = {errno.ENOSPC: "ENOSPC", errno.EIO: "EIO", errno.EACCES: "EACCES"}


def _path_of(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


class _FailingFile:
    """A file object whose writes fail with `code` once `budget` bytes are written."""

    def __init__(self, handle, code: int, budget: int):
        self.handle, self.code, self.budget = handle, code, budget

    def write(self, data) -> int:
        if len(data) > self.budget:
            self.handle.write(bytes(data[: self.budget]))  # a disk fills part-way
            self.budget = 0
            raise OSError(self.code, os.strerror(self.code))
        self.budget -= len(data)
        return self.handle.write(data)

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.handle.close()


def _fail_writes(monkeypatch, code: int, name_prefix: str, after_writes: int = 0,
                 budget: int = 300, on_failure=None) -> list:
    """Patch the checkpoint writer: the (after_writes+1)-th write of a file named
    ``.{name_prefix}*`` fails with `code`; `on_failure` runs first (to snapshot the folder)."""
    real_fdopen = os.fdopen
    seen = []

    def fdopen(fd, *args, **kwargs):
        handle = real_fdopen(fd, *args, **kwargs)
        if Path(_path_of(fd)).name.startswith(f".{name_prefix}"):
            seen.append(fd)
            if len(seen) == after_writes + 1:
                if on_failure is not None:
                    on_failure()
                return _FailingFile(handle, code, budget)
        return handle

    monkeypatch.setattr(ckpt.os, "fdopen", fdopen)
    return seen


def _hashes(*paths: Path) -> dict:
    return {path: hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
            for path in paths}


@pytest.mark.parametrize("code", ERRORS, ids=[CODE_NAMES[c] for c in ERRORS])
def test_a_failed_checkpoint_write_keeps_the_old_file_and_names_the_error(tmp_path, monkeypatch, code):
    path = tmp_path / "last.pt"
    ckpt.save_atomic({"weight": torch.arange(10.0)}, path)
    before = _hashes(path)
    _fail_writes(monkeypatch, code, "last.pt")
    with pytest.raises(CheckpointError) as info:
        ckpt.save_atomic({"weight": torch.arange(100000.0)}, path)
    assert str(info.value) == (f"cannot write checkpoint {path}: {os.strerror(code)} "
                               f"({CODE_NAMES[code]})")
    assert _hashes(path) == before
    assert torch.equal(ckpt.load_checkpoint(path)["weight"], torch.arange(10.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


@pytest.mark.parametrize("code", ERRORS, ids=[CODE_NAMES[c] for c in ERRORS])
def test_a_failed_log_append_cuts_the_file_back(tmp_path, monkeypatch, code):
    log = tmp_path / "metrics.jsonl"
    ckpt.append_line(log, '{"iteration": 1}')
    before = _hashes(log)
    real_write = os.write

    def write(fd, data):
        if _path_of(fd) == str(log):
            real_write(fd, data[:5])  # half a record reaches the disk
            raise OSError(code, os.strerror(code))
        return real_write(fd, data)

    monkeypatch.setattr(ckpt.os, "write", write)
    with pytest.raises(CheckpointError, match=f"cannot write {log}: {os.strerror(code)}"):
        ckpt.append_line(log, '{"iteration": 2, "loss": 0.5}')
    monkeypatch.undo()
    assert _hashes(log) == before


def test_a_failed_text_replace_leaves_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "run.json"
    target.write_text("{}\n")
    _fail_writes(monkeypatch, errno.ENOSPC, "run.json", budget=1)
    with pytest.raises(CheckpointError, match="No space left on device"):
        ckpt.write_text_atomic(target, '{"resumed_at": [3]}\n')
    assert target.read_text() == "{}\n"
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


# ---- through the command line ---------------------------------------------------------------------
def _train_argv(root: Path, out: Path) -> list:
    argv = ["train", str(root / "config.yaml"), "--out", str(out)]
    for override in tiny_overrides(root, "supervised", 6) + [
            "train.checkpoint_interval=2", "train.eval_interval=2"]:
        argv += ["--set", override]
    return argv


@pytest.fixture
def run_setup(tmp_path):
    root = write_tiny_dataset(tmp_path / "tiny", n_train=6, n_val=2)
    (root / "config.yaml").write_text("{}\n")
    out = tmp_path / "run"
    files = [out / "checkpoints" / "last.pt", out / "checkpoints" / "best.pt", out / "metrics.jsonl"]
    return root, out, files


def test_disk_full_at_a_checkpoint_ends_training_with_one_line_and_exit_2(run_setup, monkeypatch,
                                                                          capsys):
    root, out, files = run_setup
    snapshot = {}
    # the second write of last.pt (iteration 4) fails; best.pt and the log were written before
    _fail_writes(monkeypatch, errno.ENOSPC, "last.pt", after_writes=1,
                 on_failure=lambda: snapshot.update(_hashes(*files)))
    code = cli.main(_train_argv(root, out))
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines() == [
        f"error: cannot write checkpoint {files[0]}: No space left on device (ENOSPC)"]
    assert snapshot and all(snapshot.values())
    assert _hashes(*files) == snapshot
    assert ckpt.load_checkpoint(files[0])["iteration"] == 2
    assert ckpt.load_checkpoint(files[1])["iteration"] in (2, 4)
    assert not [p for p in out.rglob(".*") if p.is_file()], "a temporary file was left"

    # the run goes on from the previous checkpoint once there is space
    monkeypatch.undo()
    assert cli.main(_train_argv(root, out)) == 0
    assert ckpt.load_checkpoint(files[0])["iteration"] == 6


def test_disk_full_at_a_log_write_keeps_the_log_and_exits_2(run_setup, monkeypatch, capsys):
    root, out, files = run_setup
    log = files[2]
    real_write = os.write
    snapshot = {}
    appends = []

    def write(fd, data):
        if _path_of(fd) == str(log):
            appends.append(fd)
            if len(appends) == 5:  # train 1, 2, eval 2, train 3: the record of iteration 4
                snapshot.update(_hashes(*files))
                real_write(fd, data[:7])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(ckpt.os, "write", write)
    code = cli.main(_train_argv(root, out))
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines() == [
        f"error: cannot write {log}: No space left on device (ENOSPC)"]
    assert _hashes(*files) == snapshot
    assert ckpt.load_checkpoint(files[0])["iteration"] == 2
