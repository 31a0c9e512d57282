"""One way to report: `logging` for messages, `Progress` for long loops.

Rules the package follows:

- A command's *result* (the metrics of ``farcluss eval``, a JSON object, the path of what it
  wrote) is printed to stdout: it is what a user pipes or reads.
- Every other message goes through a logger under ``farcluss`` (``get_logger(__name__)``):
  ``logger.info`` for status, ``logger.warning`` for something the user should act on. They
  are lines on stderr; a warning reads ``warning: …``. Under DDP only rank 0 shows INFO, the
  other ranks WARNING and above (``setup_logging`` reads the rank from ``RANK``).
- `warnings.warn` is for deprecations only.
- Progress of a loop is a `Progress`: a tqdm bar when its stream is a terminal, otherwise a
  plain line every `every` iterations (a log file gets no carriage-return frames).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, Mapping, Optional, TextIO

from tqdm import tqdm

#: the logger every farcluss module's logger descends from
ROOT_LOGGER = "farcluss"


def get_logger(name: str) -> logging.Logger:
    """The logger of module `name` (pass ``__name__``); its records reach the handler that
    `setup_logging` puts on ``farcluss``."""
    return logging.getLogger(name)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted (pytest's capture, a
    redirected stream), not to the stream that was current at setup."""

    @property
    def stream(self) -> TextIO:  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


class _LineFormatter(logging.Formatter):
    """INFO as the bare message, WARNING and above prefixed ``warning:`` / ``error:``; one line."""

    def format(self, record: logging.LogRecord) -> str:
        message = " ".join(record.getMessage().split())
        if record.levelno >= logging.ERROR:
            return f"error: {message}"
        if record.levelno >= logging.WARNING:
            return f"warning: {message}"
        return message


def setup_logging(rank: Optional[int] = None, debug: bool = False) -> logging.Logger:
    """Send the ``farcluss`` loggers to stderr: INFO and above on rank 0, WARNING and above on
    the other ranks (`rank` None → the ``RANK`` environment variable torchrun sets, else 0);
    `debug` adds DEBUG on rank 0. Calling it again replaces the handler (no duplicate lines)."""
    if rank is None:
        try:
            rank = int(os.environ.get("RANK", "0"))
        except ValueError:
            rank = 0
    logger = logging.getLogger(ROOT_LOGGER)
    for handler in [h for h in logger.handlers if isinstance(h, _StderrHandler)]:
        logger.removeHandler(handler)
    handler = _StderrHandler()
    handler.setFormatter(_LineFormatter())
    logger.addHandler(handler)
    if rank != 0:
        logger.setLevel(logging.WARNING)
    else:
        logger.setLevel(logging.DEBUG if debug else logging.INFO)
    # our handler prints the lines; the root logger (pytest's, an application's) need not repeat them
    logger.propagate = False
    return logger


def _format_postfix(postfix: Optional[Mapping[str, Any]]) -> str:
    if not postfix:
        return ""
    parts = []
    for key, value in postfix.items():
        parts.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
    return " ".join(parts)


class Progress:
    """Progress of a loop of `total` iterations, as a bar in a terminal and as lines elsewhere.

    Usage (the trainer, the demo, the benchmark)::

        progress = Progress(total, initial=start, desc="farcluss", every=cfg.train.log_interval)
        for ...:
            ...
            progress.update(1, postfix={"loss": loss})   # postfix: optional, shown on the bar / line
        progress.close()

    or ``with Progress(...) as progress:``. When `stream` (default stderr, where tqdm draws) is a
    terminal it is a tqdm bar, redrawn in place. Otherwise (a file, a pipe, a batch job's log) no
    bar is drawn: every `every` iterations, and at the last one, one line
    ``desc: n/total (pct%) postfix, s/it`` is written to `stream`, so a log file holds one line
    per `every` iterations and no carriage returns. `enabled=False` shows nothing (other ranks,
    ``train.progress: false``); `update` still counts.
    """

    def __init__(self, total: int, initial: int = 0, desc: str = "", every: int = 20,
                 stream: Optional[TextIO] = None, enabled: bool = True):
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.total = int(total)
        self.n = int(initial)
        self.desc = desc
        self.every = int(every)
        self.enabled = enabled
        self._stream = stream
        self._bar = None
        self._postfix: Optional[Mapping[str, Any]] = None
        self._start_time = time.perf_counter()
        self._start_n = self.n
        if enabled and self._is_terminal():
            self._bar = tqdm(total=self.total, initial=self.n, desc=desc, dynamic_ncols=True,
                             leave=False, file=self.stream)

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stderr

    @property
    def is_bar(self) -> bool:
        """True when progress is drawn as a tqdm bar (the stream is a terminal)."""
        return self._bar is not None

    def _is_terminal(self) -> bool:
        isatty = getattr(self.stream, "isatty", None)
        try:
            return bool(isatty and isatty())
        except ValueError:  # a closed stream
            return False

    def update(self, n: int = 1, postfix: Optional[Mapping[str, Any]] = None) -> None:
        """Advance by `n` iterations; `postfix` (name → value) replaces the shown statistics."""
        before = self.n
        self.n += n
        if postfix is not None:
            self._postfix = dict(postfix)
        if not self.enabled:
            return
        if self._bar is not None:
            if postfix is not None:
                self._bar.set_postfix(self._postfix, refresh=False)
            self._bar.update(n)
            return
        crossed = self.n // self.every > before // self.every
        if crossed or (self.n >= self.total > before):
            self._write_line()

    def _write_line(self) -> None:
        done = self.n - self._start_n
        elapsed = time.perf_counter() - self._start_time
        percent = 100.0 * self.n / self.total if self.total else 100.0
        parts = [f"{self.desc}: " if self.desc else "", f"{self.n}/{self.total} ({percent:.0f}%)"]
        postfix = _format_postfix(self._postfix)
        if postfix:
            parts.append(f" {postfix}")
        if done > 0:
            parts.append(f", {elapsed / done:.3g} s/it")
        self.stream.write("".join(parts) + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
