"""Stop signals (issue 17): SIGTERM/SIGINT/SIGUSR1 finish the iteration, save last.pt, print one
line with the resume command and exit 128 + signum; the resumed run is bitwise the run that was
never stopped. The bitwise check reuses test_resume's uninterrupted reference run."""

from __future__ import annotations

import json
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import write_tiny_dataset
from farcluss.config import load_config
from farcluss.engine.checkpoint import load_checkpoint
from farcluss.engine.signals import StopRequest, exit_status, resume_command
from farcluss.errors import ConfigError
from test_resume import (ITERATIONS, _assert_same_models, _environment, _last_train_iteration,
                         _run, _stop, _train_args, _train_records, _wait_for, reference)  # noqa: F401

# the run pauses in its first write of last.pt (the stop's save: periodic saves are off) long
# enough for the test to send a second signal into the save
PAUSING_WRITER = """
import sys, time
from pathlib import Path
from farcluss.engine import checkpoint
from farcluss.cli import main

marker = Path(sys.argv[1])

def pause_in_write(tmp_path):
    if tmp_path.name.startswith(".last.pt") and not marker.exists():
        staging = marker.with_name(marker.name + ".partial")
        staging.write_text(str(tmp_path))
        staging.replace(marker)
        time.sleep(3)

checkpoint._write_hook = pause_in_write
sys.exit(main(sys.argv[2:]))
"""


def _popen(argv: list, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(argv, env=kwargs.pop("env", _environment()), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def _stop_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def _resume_from_line(line: str) -> list:
    """The resume command the stop line gives, as python -m farcluss arguments."""
    command = shlex.split(line.split("resume with: ", 1)[1])
    assert command[:2] == ["farcluss", "train"]
    return command[1:]


def test_exit_status_is_128_plus_the_signal_number():
    assert exit_status(signal.SIGTERM) == 143
    assert exit_status(signal.SIGINT) == 130
    assert exit_status(signal.SIGUSR1) == 128 + signal.SIGUSR1


def test_a_signal_only_records_the_request_while_installed():
    previous = signal.getsignal(signal.SIGUSR1)
    with StopRequest(["SIGUSR1"]) as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.01)  # the handler runs between bytecodes of the main thread
        assert stop.requested and stop.signum == signal.SIGUSR1
        assert stop.agreed(torch.device("cpu"))
    assert signal.getsignal(signal.SIGUSR1) == previous


def test_stop_signals_are_validated_at_load():
    with pytest.raises(ConfigError, match="train.stop_signals"):
        load_config(None, ["train.stop_signals=[SIGKILL]"])
    with pytest.raises(ConfigError, match="train.dist_timeout"):
        load_config(None, ["train.dist_timeout=0"])


def test_resume_command_drops_nothing_but_names_the_run_folder():
    command = resume_command("cfg.yaml", ["train.lr=0.1", "data.root=/a b"], Path("runs/x"), False)
    assert shlex.split(command) == ["farcluss", "train", "cfg.yaml", "--set", "train.lr=0.1",
                                    "--set", "data.root=/a b", "--out", "runs/x"]


@pytest.mark.slow
def test_sigterm_at_a_random_iteration_saves_and_resumes_bitwise(reference, tmp_path):
    root, uninterrupted = reference
    out = tmp_path / "stopped"
    # periodic saves off: the stop's save is the only way last.pt can exist
    args = _train_args(root, out, "train.checkpoint_interval=1000")
    stop_after = random.Random(17).randrange(1, ITERATIONS - 4)
    process = _popen([sys.executable, "-m", "farcluss", *args])
    try:
        _wait_for(lambda: _last_train_iteration(out / "metrics.jsonl") >= stop_after, process)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    finally:
        _stop(process)
    assert process.returncode == 143, err
    line = _stop_line(err)
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    stopped_at = state["iteration"]
    assert stop_after <= stopped_at < ITERATIONS
    assert line.startswith(f"farcluss: stopped by SIGTERM after iteration {stopped_at} of "
                           f"{ITERATIONS}; saved {out / 'checkpoints' / 'last.pt'}; resume with: ")
    # the log ends at the stop; nothing past it
    assert _last_train_iteration(out / "metrics.jsonl") == stopped_at

    # the printed command, as a user would paste it
    _run(_resume_from_line(line))
    _assert_same_models(out / "checkpoints" / "last.pt", uninterrupted / "checkpoints" / "last.pt")
    assert _train_records(out / "metrics.jsonl") == _train_records(uninterrupted / "metrics.jsonl")


@pytest.mark.slow
def test_a_second_signal_during_the_save_changes_nothing(reference, tmp_path):
    root, uninterrupted = reference
    out = tmp_path / "twice"
    marker = tmp_path / "saving"
    # a data-loading worker too: it must survive the signals sent to the whole process group
    args = _train_args(root, out, "train.checkpoint_interval=1000", "train.num_workers=1")
    process = _popen([sys.executable, "-c", PAUSING_WRITER, str(marker), *args],
                     start_new_session=True)
    try:
        _wait_for(lambda: _last_train_iteration(out / "metrics.jsonl") >= 2, process)
        os.killpg(process.pid, signal.SIGUSR1)  # like a terminal or SLURM: every process
        _wait_for(marker.is_file, process)
        partial = Path(marker.read_text())
        assert partial.is_file()  # inside the write
        os.killpg(process.pid, signal.SIGUSR1)
        _, err = process.communicate(timeout=60)
    finally:
        _stop(process)
    assert process.returncode == 128 + signal.SIGUSR1, err
    assert "stopped by SIGUSR1" in _stop_line(err)
    assert not partial.exists()
    assert not list((out / "checkpoints").glob(".*"))
    stopped_at = load_checkpoint(out / "checkpoints" / "last.pt")["iteration"]
    assert 2 <= stopped_at < ITERATIONS

    _run(args)
    _assert_same_models(out / "checkpoints" / "last.pt", uninterrupted / "checkpoints" / "last.pt")


# ---- two ranks --------------------------------------------------------------------------------
WORLD_SIZE = 2
DDP_ITERATIONS = 8


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _ddp_config(root: Path, tmp_path: Path, **train) -> Path:
    config = tmp_path / f"ddp-{len(list(tmp_path.glob('ddp-*.yaml')))}.yaml"
    config.write_text(json.dumps({
        "data": {"root": str(root), "crop_size": 32},
        "model": {"backbone": "resnet18", "base_width": 8},
        "method": {"name": "fixmatch"},
        "train": {"iterations": DDP_ITERATIONS, "batch_size": 1, "num_workers": 0,
                  "device": "cpu", "eval_interval": 1000, "checkpoint_interval": 1000,
                  "log_interval": 1, "progress": False, "deterministic": True, "amp": "off",
                  **train}}))
    return config


def _start_ranks(config: Path, out: Path) -> list:
    env = dict(_environment(), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               WORLD_SIZE=str(WORLD_SIZE))
    return [_popen([sys.executable, "-m", "farcluss", "train", str(config), "--out", str(out)],
                   env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)))
            for rank in range(WORLD_SIZE)]


def _finish(processes: list, timeout: float = 120) -> list:
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=timeout))
    finally:
        for process in processes:
            _stop(process)
    return outputs


@pytest.mark.slow
def test_two_ranks_stop_at_the_same_iteration_when_one_rank_gets_the_signal(tmp_path):
    root = write_tiny_dataset(tmp_path / "data")
    config = _ddp_config(root, tmp_path)
    uninterrupted = tmp_path / "uninterrupted"
    reference_ranks = _start_ranks(config, uninterrupted)
    outputs = _finish(reference_ranks)
    assert [process.returncode for process in reference_ranks] == [0, 0], outputs

    out = tmp_path / "stopped"
    processes = _start_ranks(config, out)
    try:
        _wait_for(lambda: _last_train_iteration(out / "metrics.jsonl") >= 2, processes[0])
        processes[1].send_signal(signal.SIGTERM)  # rank 1 only; rank 0 writes
    finally:
        outputs = _finish(processes)
    codes = [process.returncode for process in processes]
    assert codes == [143, 143], outputs
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    stopped_at = state["iteration"]
    assert 2 <= stopped_at < DDP_ITERATIONS
    assert len(state["rank_states"]) == WORLD_SIZE
    assert f"stopped by SIGTERM after iteration {stopped_at} of {DDP_ITERATIONS}" in outputs[0][1]

    resumed = _start_ranks(config, out)
    outputs = _finish(resumed)
    assert [process.returncode for process in resumed] == [0, 0], outputs
    got = load_checkpoint(out / "checkpoints" / "last.pt")
    want = load_checkpoint(uninterrupted / "checkpoints" / "last.pt")
    assert got["iteration"] == want["iteration"] == DDP_ITERATIONS
    # Not compared bitwise: a 2-rank run resumed after a SIGKILL at a periodic checkpoint differs
    # from the uninterrupted one in the same way (found while writing this test; reported), so
    # the difference is the DDP resume's, not the stop's. One process is compared bitwise above.
    assert [r["iteration"] for r in _train_records(out / "metrics.jsonl")] == list(
        range(1, DDP_ITERATIONS + 1))


@pytest.mark.slow
def test_a_killed_rank_ends_the_other_within_the_timeout(tmp_path):
    root = write_tiny_dataset(tmp_path / "data")
    timeout = 30
    config = _ddp_config(root, tmp_path, iterations=200, checkpoint_interval=2,
                         dist_timeout=timeout)
    out = tmp_path / "run"
    processes = _start_ranks(config, out)
    try:
        _wait_for(lambda: _last_train_iteration(out / "metrics.jsonl") >= 3
                  and (out / "checkpoints" / "last.pt").is_file(), processes[0])
        processes[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        _, err = processes[0].communicate(timeout=timeout + 30)
        elapsed = time.monotonic() - killed
    finally:
        _finish(processes)
    assert processes[0].returncode not in (0, None)
    assert elapsed < timeout, elapsed
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: rank 0 of 2 stopped at iteration ")
    assert "rank 1 of 2 is gone" in lines[0]
    assert f"a restart resumes from {out / 'checkpoints' / 'last.pt'}" in lines[0]
