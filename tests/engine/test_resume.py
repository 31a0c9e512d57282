"""Exact resume after a crash (issue 6): a run killed with SIGKILL and resumed ends bitwise equal
to a run that was never interrupted, including a kill in the middle of a checkpoint write."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import tiny_overrides, write_tiny_dataset
from farcluss import cli
from farcluss.engine.checkpoint import load_checkpoint

ITERATIONS = 12
CHECKPOINT_INTERVAL = 3

# the run pauses inside its second write of last.pt (at iteration 2 · CHECKPOINT_INTERVAL): the
# temporary file holds part of the bytes, nothing is flushed, fsync'ed or renamed yet
PAUSING_WRITER = """
import sys, time
from pathlib import Path
from farcluss.engine import checkpoint
from farcluss.cli import main

marker = Path(sys.argv[1])
writes = []

def pause_in_second_write(tmp_path):
    if tmp_path.name.startswith(".last.pt"):
        writes.append(tmp_path)
        if len(writes) == 2:
            # rename: the test must never read a half-written marker
            staging = marker.with_name(marker.name + ".partial")
            staging.write_text(str(tmp_path))
            staging.replace(marker)
            time.sleep(600)

checkpoint._write_hook = pause_in_second_write
sys.exit(main(sys.argv[2:]))
"""


# the run crashes (exit 137, as under SIGKILL) right after its second complete write of last.pt:
# a deterministic point to resume from, at iteration 2 · CHECKPOINT_INTERVAL
CRASHING_WRITER = """
import os, sys
from pathlib import Path
from farcluss.engine import checkpoint
from farcluss.cli import main

save_atomic = checkpoint.save_atomic
writes = []

def crash_after_second_write(obj, path):
    save_atomic(obj, path)
    if Path(path).name == "last.pt":
        writes.append(path)
        if len(writes) == 2:
            os._exit(137)

checkpoint.save_atomic = crash_after_second_write
sys.exit(main(sys.argv[1:]))
"""


def _environment() -> dict:
    env = dict(os.environ)
    # one thread per process: several runs share two cores, and spinning threads crawl
    env.update(KMP_BLOCKTIME="0", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _train_args(root: Path, out: Path, *extra: str, method: str = "farcluss") -> list:
    overrides = tiny_overrides(root, method, ITERATIONS) + [
        "train.deterministic=true", f"train.checkpoint_interval={CHECKPOINT_INTERVAL}",
        # exercise every persistent buffer: class-count EMA, prototypes, the warm-up restart
        "method.rebalance=ema", "method.warmup_iterations=2", *extra]
    config = root / "empty.yaml"
    config.write_text("{}\n")
    args = ["train", str(config), "--out", str(out)]
    for override in overrides:
        args += ["--set", override]
    return args


def _run(args: list, timeout: float = 120) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "farcluss", *args], env=_environment(),
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr
    return done


def _last_train_iteration(metrics: Path) -> int:
    if not metrics.is_file():
        return 0
    iterations = [0]
    for line in metrics.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("type") == "train":
            iterations.append(record["iteration"])
    return max(iterations)


def _wait_for(condition, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the run ended (code {process.returncode}) before it was killed: "
                                 f"{process.stderr.read() if process.stderr else ''}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("the run made no progress")
        time.sleep(0.01)


def _kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL


def _stop(process: subprocess.Popen) -> None:
    """Never leave a paused or running child behind a failed test."""
    if process.poll() is None:
        process.kill()
        process.wait(timeout=30)


def _train_records(metrics: Path) -> list:
    """Training log records without the wall-clock fields."""
    records = []
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        if record["type"] == "train":
            records.append({k: v for k, v in record.items()
                            if k not in ("seconds_per_iteration", "data_wait_fraction")})
    return records


def _assert_same_models(resumed: Path, reference: Path) -> None:
    got, want = load_checkpoint(resumed), load_checkpoint(reference)
    assert got["iteration"] == want["iteration"] == ITERATIONS
    for part in ("student", "teacher"):
        if want[part] is None:  # no separate teacher (unimatch's online pseudo-labels)
            assert got[part] is None, part
            continue
        assert got[part].keys() == want[part].keys()
        differing = [key for key in want[part] if not torch.equal(got[part][key], want[part][key])]
        assert not differing, f"{part} differs from the uninterrupted run in {differing[:5]}"
    assert got["ema_steps"] == want["ema_steps"]
    assert got["best_miou"] == want["best_miou"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The tiny dataset and an uninterrupted run of it."""
    root = write_tiny_dataset(tmp_path_factory.mktemp("resume") / "tiny")
    out = root.parent / "uninterrupted"
    _run(_train_args(root, out))
    return root, out


@pytest.mark.slow
def test_run_killed_at_a_random_iteration_resumes_bitwise_exactly(reference, tmp_path):
    root, uninterrupted = reference
    out = tmp_path / "killed"
    kill_after = random.randrange(CHECKPOINT_INTERVAL + 1, ITERATIONS - 1)
    process = subprocess.Popen([sys.executable, "-m", "farcluss", *_train_args(root, out)],
                               env=_environment(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: (out / "checkpoints" / "last.pt").is_file()
                  and _last_train_iteration(out / "metrics.jsonl") >= kill_after, process)
        _kill(process)
    finally:
        _stop(process)
    interrupted_at = load_checkpoint(out / "checkpoints" / "last.pt")["iteration"]
    assert CHECKPOINT_INTERVAL <= interrupted_at < ITERATIONS, f"killed after {kill_after}"

    # no --resume: a run folder with last.pt resumes by itself
    _run(_train_args(root, out))
    _assert_same_models(out / "checkpoints" / "last.pt", uninterrupted / "checkpoints" / "last.pt")
    # the replayed iterations are logged once, with the values of the uninterrupted run
    assert _train_records(out / "metrics.jsonl") == _train_records(uninterrupted / "metrics.jsonl")
    info = json.loads((out / "run.json").read_text())
    assert [entry["iteration"] for entry in info["resumed_at"]] == [interrupted_at]


@pytest.mark.slow
def test_kill_during_a_checkpoint_write_keeps_the_previous_one_and_resumes_exactly(
        reference, tmp_path):
    root, uninterrupted = reference
    out = tmp_path / "killed_in_write"
    marker = tmp_path / "writing"
    # one data-loading worker: the same stream as in-process loading (seeds travel with indices)
    args = _train_args(root, out, "train.num_workers=1")
    process = subprocess.Popen([sys.executable, "-c", PAUSING_WRITER, str(marker), *args],
                               env=_environment(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(marker.is_file, process)
        partial = Path(marker.read_text())
        assert partial.is_file()
        _kill(process)
    finally:
        _stop(process)

    last = out / "checkpoints" / "last.pt"
    state = load_checkpoint(last)  # loadable: the interrupted write never touched it
    assert state["iteration"] == CHECKPOINT_INTERVAL

    _run(["--debug", *args, "--resume"])
    assert not partial.exists(), "the stale temporary file of the killed write was not removed"
    _assert_same_models(last, uninterrupted / "checkpoints" / "last.pt")


def test_resume_flag_without_a_checkpoint_is_a_one_line_error(tmp_path, capsys):
    root = write_tiny_dataset(tmp_path / "tiny", n_train=6, n_val=2)
    out = tmp_path / "fresh"
    assert cli.main([*_train_args(root, out), "--resume"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --resume given but {out / 'checkpoints' / 'last.pt'} does not exist"]
    assert not out.exists()


# the skeletons beside the default one: UniMatch V1 (online pseudo-labels, two views, dropout
# copy), its V2 reading (EMA teacher, complementary masks), FARCLUSS on two views with the dropout
# copy. A low threshold lets the young model's pseudo-labels into the unlabeled terms.
SKELETON_CASES = {
    "unimatch": ("unimatch", ["method.threshold=0.4"]),
    "unimatch_v2": ("unimatch", ["method.threshold=0.4", "method.teacher=ema",
                                 "method.feature_perturbation=complementary"]),
    "farcluss_two_views": ("farcluss", ["method.strong_views=2",
                                        "method.feature_perturbation=dropout"]),
    # distribution alignment's running means live in the method and must resume too
    "farcluss_aligned": ("farcluss", ["method.distribution_alignment=labels"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(SKELETON_CASES))
def test_every_skeleton_resumes_bitwise_exactly_after_a_crash(reference, tmp_path, case):
    root, _ = reference
    method, extra = SKELETON_CASES[case]
    uninterrupted, out = tmp_path / "uninterrupted", tmp_path / "crashed"
    _run(_train_args(root, uninterrupted, *extra, method=method))
    crashed = subprocess.run([sys.executable, "-c", CRASHING_WRITER,
                              *_train_args(root, out, *extra, method=method)],
                             env=_environment(), capture_output=True, text=True, timeout=120)
    assert crashed.returncode == 137, crashed.stderr
    last = out / "checkpoints" / "last.pt"
    assert load_checkpoint(last)["iteration"] == 2 * CHECKPOINT_INTERVAL
    _run(_train_args(root, out, *extra, method=method))
    _assert_same_models(last, uninterrupted / "checkpoints" / "last.pt")
    records = _train_records(out / "metrics.jsonl")
    assert records == _train_records(uninterrupted / "metrics.jsonl")
    # the unlabeled terms of the skeleton were trained, not skipped
    names = {"unimatch": {"loss_unsup", "loss_unsup2", "loss_fp"},
             "unimatch_v2": {"loss_unsup", "loss_unsup2"},
             "farcluss_two_views": {"loss_unsup", "loss_unsup2", "loss_fp", "loss_con"},
             "farcluss_aligned": {"loss_unsup", "loss_con", "alignment_ratio_max"}}[case]
    assert names <= set(records[-1])
