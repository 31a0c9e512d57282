"""Messages through `logging` (rank 0 only under DDP) and progress that draws a bar only in a
terminal: a log file gets one plain line every N iterations and no carriage-return frames."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import struct
import subprocess
import sys
import termios

import pytest

from conftest import tiny_overrides, write_tiny_checkpoint, write_tiny_dataset
from farcluss.log import Progress, get_logger, setup_logging


class Terminal(io.StringIO):
    """A text stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_rank_0_shows_info_and_prefixes_warnings(capsys, restore_logging):
    setup_logging(rank=0)
    log = get_logger("farcluss.some.module")
    log.info("making  the dataset\n in /tmp (once)")
    log.warning("2 image(s) are in both lists")
    log.debug("not shown")
    assert capsys.readouterr().err.splitlines() == [
        "making the dataset in /tmp (once)", "warning: 2 image(s) are in both lists"]


def test_other_ranks_show_warnings_only(capsys, restore_logging):
    setup_logging(rank=1)
    log = get_logger("farcluss.x")
    log.info("status")
    log.warning("act on this")
    log.error("failed")
    assert capsys.readouterr().err.splitlines() == ["warning: act on this", "error: failed"]


def test_the_rank_comes_from_torchrun_s_environment(capsys, monkeypatch, restore_logging):
    monkeypatch.setenv("RANK", "3")
    setup_logging()
    get_logger("farcluss.x").info("status")
    assert capsys.readouterr().err == ""


def test_setting_up_twice_prints_each_line_once(capsys, restore_logging):
    setup_logging(rank=0)
    setup_logging(rank=0)
    get_logger("farcluss.x").warning("once")
    assert capsys.readouterr().err == "warning: once\n"


def test_progress_in_a_file_is_a_line_every_n_iterations():
    stream = io.StringIO()
    progress = Progress(10, initial=2, desc="farcluss", every=4, stream=stream)
    for step in range(8):
        progress.update(1, postfix={"loss": 1.0 / (step + 1)})
    progress.close()
    text = stream.getvalue()
    assert "\r" not in text and not progress.is_bar
    lines = text.splitlines()
    # iterations 3..10: lines when 4 and 8 are reached, and at the last iteration
    assert [line.split()[1] for line in lines] == ["4/10", "8/10", "10/10"]
    assert lines[0].startswith("farcluss: 4/10 (40%) loss=0.5")
    assert lines[-1].startswith("farcluss: 10/10 (100%) loss=0.125")
    assert all(line.endswith("s/it") for line in lines)


def test_progress_in_a_terminal_is_a_bar():
    stream = Terminal()
    with Progress(5, desc="eval", every=100, stream=stream) as progress:
        assert progress.is_bar
        for _ in range(5):
            progress.update(1)
    assert "\r" in stream.getvalue() and "eval" in stream.getvalue()


def test_disabled_progress_writes_nothing_but_counts():
    for stream in (io.StringIO(), Terminal()):
        progress = Progress(4, every=1, stream=stream, enabled=False)
        progress.update(4)
        progress.close()
        assert stream.getvalue() == "" and progress.n == 4


def test_every_must_be_positive():
    with pytest.raises(ValueError, match="every"):
        Progress(4, every=0)


def _eval_argv(tmp_path):
    root = write_tiny_dataset(tmp_path / "tiny", n_train=4, n_val=4)
    checkpoint = write_tiny_checkpoint(tmp_path / "ckpt" / "last.pt", root)
    argv = [sys.executable, "-m", "farcluss", "eval", "--checkpoint", str(checkpoint)]
    for override in tiny_overrides(root):
        argv += ["--set", override]
    return argv


def test_a_command_whose_output_is_a_file_writes_lines_a_terminal_gets_the_bar(tmp_path):
    argv = _eval_argv(tmp_path)
    env = dict(os.environ, KMP_BLOCKTIME="0")
    log = tmp_path / "eval.log"
    with open(log, "w") as handle:
        done = subprocess.run(argv, stdout=handle, stderr=subprocess.STDOUT, timeout=300, env=env)
    assert done.returncode == 0
    text = log.read_bytes().decode()  # bytes: read_text would turn a "\r" into "\n"
    assert "mIoU" in text and "\r" not in text
    assert "eval: 4/4 (100%)" in text

    # the same command with a terminal as its stderr draws the bar (carriage returns)
    controller, terminal = pty.openpty()
    # a fresh pty is 0 columns wide, where tqdm draws nothing: give it a terminal's size
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    try:
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=terminal, env=env)
        os.close(terminal)
        chunks = []
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        assert process.wait(timeout=300) == 0
    finally:
        os.close(controller)
    drawn = b"".join(chunks).decode(errors="replace")
    assert "\r" in drawn and "eval" in drawn
