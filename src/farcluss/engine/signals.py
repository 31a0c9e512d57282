"""Stopping a run from outside: a stop signal saves the run and ends it with a known status.

Clusters stop jobs with a signal before they kill them (SLURM: SIGTERM, or SIGUSR1 with
``--signal``; Kubernetes: SIGTERM; a terminal: SIGINT on Ctrl-C). While a :class:`StopRequest`
is installed, those signals (`train.stop_signals`) only *record* that a stop was asked for; the
training loop looks at the record after each iteration, so the current iteration finishes,
``last.pt`` is written (atomically) and the process exits with ``128 + signal number`` — the
shell's convention: 143 for SIGTERM, 130 for SIGINT, 138 for SIGUSR1.

A second signal while the run saves is noted and ignored, so it cannot cut the save short;
a third ends the process at once (what a user pressing Ctrl-C repeatedly wants). Even then
``last.pt`` is either the previous or the new complete file: every checkpoint write is atomic.

Under DDP the ranks must stop after the *same* iteration, whichever of them got the signal (a
launcher may signal one rank only, or the signals arrive between two iterations on different
ranks): :meth:`StopRequest.agreed` all-reduces the flag once per iteration, one 1-element
tensor, so every rank sees a stop as soon as any rank does.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import shlex
import signal
import sys
import threading
from typing import Dict, List, Optional, Sequence

import torch

from farcluss.config import STOP_SIGNAL_NAMES
from farcluss.engine import distributed
from farcluss.errors import ConfigError

#: signals after which the process ends at once instead of waiting for the save
_FORCE_AFTER = 3


def signal_numbers(names: Sequence[str]) -> List[int]:
    """The numbers of ``names`` (e.g. ``["SIGTERM", "SIGUSR1"]``); ConfigError for others."""
    numbers = []
    for name in names:
        if name not in STOP_SIGNAL_NAMES or not hasattr(signal, name):
            raise ConfigError(f"config key 'train.stop_signals' lists {name!r}; choose from "
                              f"{', '.join(STOP_SIGNAL_NAMES)}")
        numbers.append(int(getattr(signal, name)))
    return numbers


def exit_status(signum: int) -> int:
    """The status a run stopped by `signum` exits with: 128 + signum (143 for SIGTERM)."""
    return 128 + int(signum)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class StopRequest:
    """Records stop signals while installed; the loop asks :meth:`agreed` after each iteration.

    Use as a context manager around the loop: the previous handlers come back on exit.
    Installing is a no-op outside the main thread (Python delivers signals only there).
    """

    def __init__(self, names: Sequence[str]):
        self.signals = signal_numbers(names)
        self.signum: Optional[int] = None
        self.count = 0
        self._previous: Dict[int, object] = {}

    # ---- handler --------------------------------------------------------------------------------
    def _handle(self, signum: int, frame) -> None:
        # only assignments here: the handler may run between any two bytecodes of the loop
        self.count += 1
        if self.signum is None:
            self.signum = signum
        if self.count >= _FORCE_AFTER:
            # last.pt is whole whatever happens: the write is atomic, a stale temporary
            # file is removed by the next start
            os._exit(exit_status(self.signum))

    def install(self) -> "StopRequest":
        if threading.current_thread() is not threading.main_thread():
            return self
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def uninstall(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def __enter__(self) -> "StopRequest":
        return self.install()

    def __exit__(self, *exc_info) -> None:
        self.uninstall()

    # ---- the loop's question --------------------------------------------------------------------
    @property
    def requested(self) -> bool:
        """A stop signal reached this process."""
        return self.signum is not None

    def agreed(self, device: torch.device) -> bool:
        """Whether any rank got a stop signal; every rank must call it at the same iteration.

        One process: the local flag. Under DDP: the flag's maximum over ranks (a 1-element
        all-reduce on the statistics group), and the signal number of the lowest rank that got
        one, so every rank can report it.
        """

        if distributed.world_size() == 1:
            return self.requested
        number = self.signum if self.signum is not None else 0
        votes = distributed.max_over_ranks(torch.tensor([float(number)], device=device))
        if votes.item() > 0 and self.signum is None:
            self.signum = int(votes.item())
        return bool(votes.item() > 0)


def ignore_in_worker(names: Sequence[str]):
    """A DataLoader ``worker_init_fn`` that makes the workers ignore the stop signals.

    A terminal sends Ctrl-C to the whole process group and SLURM signals every process of a
    step: a worker that died of it would end the main process's last iteration with
    "DataLoader worker exited unexpectedly". The main process shuts its workers down itself.
    """
    global _reaper_registered
    if not _reaper_registered:
        atexit.register(_kill_daemonic_children)
        _reaper_registered = True
    return _WorkerInit(signal_numbers(names))


_reaper_registered = False


def _kill_daemonic_children() -> None:
    """At exit, SIGKILL the data-loading workers still alive (an error ended the loop).

    multiprocessing ends daemonic children with SIGTERM and then waits for them; a worker that
    ignores SIGTERM would make that wait endless. Registered after multiprocessing's own exit
    function, so it runs first.
    """
    # torch's DataLoader installs a SIGCHLD handler that raises when a worker dies: the kill
    # below would raise it inside join() and leave the worker unreaped (and the exit hung)
    if hasattr(signal, "SIGCHLD"):
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()
            child.join(timeout=5)


class _WorkerInit:
    """Picklable worker_init_fn (workers may be spawned, not forked)."""

    def __init__(self, numbers: List[int]):
        self.numbers = numbers

    def __call__(self, worker_id: int) -> None:
        for signum in self.numbers:
            signal.signal(signum, signal.SIG_IGN)


def stop_message(iteration: int, total: int, signum: int, checkpoint, resume_command: str) -> str:
    """The one line a stopped run prints: where it stopped and the command that resumes it."""
    return (f"stopped by {signal_name(signum)} after iteration {iteration} of {total}; "
            f"saved {checkpoint}; resume with: {resume_command}")


def resume_command(config: Optional[str], overrides: Sequence[str], out, distributed: bool) -> str:
    """The command that resumes a run: the same config and overrides, its run folder named."""
    argv = ["farcluss", "train"] + ([str(config)] if config else [])
    for override in overrides:
        argv += ["--set", override]
    argv += ["--out", str(out)]
    command = shlex.join(argv)
    if distributed:
        command += " (under the same launcher, e.g. torchrun, with the same number of ranks)"
    return command


class RunStopped(Exception):
    """A run inside a larger command (bench, demo) was stopped by a signal: end the command.

    The command cannot report a run that did not finish; it ends with the run's status
    (``128 + signum``) and one line, and keeps what the runs before it wrote.
    """

    def __init__(self, signum: int, iteration: int, run_dir):
        self.signum = int(signum)
        self.iteration = int(iteration)
        self.run_dir = str(run_dir)
        super().__init__(f"stopped by {signal_name(signum)} after iteration {iteration} of the run "
                         f"in {run_dir}; the runs that finished before it are kept")


def raise_if_stopped(summary: Dict, run_dir) -> None:
    """:class:`RunStopped` when ``Trainer.fit``'s `summary` says a signal stopped the run."""
    if summary.get("stopped_by") is not None:
        raise RunStopped(summary["stopped_by"], summary["iteration"], run_dir)


def print_stop(message: str) -> None:
    print(f"farcluss: {message}", file=sys.stderr, flush=True)
