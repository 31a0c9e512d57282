"""The run folder: `config.yaml`, `run.json`, `metrics.jsonl` (and its truncation on resume),
TensorBoard events and the checkpoint paths. Only rank 0 writes (the trainer makes a
`RunFolder` on every rank; `writes` is False off rank 0 and every method is then a no-op)."""

from __future__ import annotations

import json
import math
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

import farcluss
from farcluss.config import Config, dump_config
from farcluss.engine import checkpoint as ckpt
from farcluss.engine.tensorboard import TensorBoardLogger
from farcluss.errors import FarclussError


def git_revision() -> Optional[str]:
    """The commit of the installed source tree, when it is a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def to_loggable(value: Any) -> Any:
    """A tensor or float as JSON: rounded to 6 digits, non-finite values as null."""
    if isinstance(value, torch.Tensor):
        value = value.detach().float().cpu()
        if value.numel() == 1:
            item = value.item()
            return None if not math.isfinite(item) else round(item, 6)
        return [None if not math.isfinite(v) else round(v, 6) for v in value.tolist()]
    if isinstance(value, float):
        return round(value, 6)
    return value


@dataclass
class RunPaths:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def last(self) -> Path:
        return self.root / "checkpoints" / "last.pt"

    @property
    def best(self) -> Path:
        return self.root / "checkpoints" / "best.pt"

    @property
    def run_info(self) -> Path:
        return self.root / "run.json"


class RunFolder:
    """What a run writes besides checkpoints; every write is atomic or an append that a
    failure cuts back (engine/checkpoint.py)."""

    def __init__(self, root: Path, writes: bool, tensorboard: bool, classes: List[str]):
        self.paths = RunPaths(Path(root))
        self.writes = writes
        self.tensorboard = tensorboard
        self.classes = list(classes)
        self._tensorboard: Optional[TensorBoardLogger] = None  # opened by the first log()

    def prepare(self, cfg: Config, info: Dict[str, Any], resumed_from: Optional[int]) -> None:
        """Create the folder, write config.yaml and run.json (a fresh start) or note the resume."""
        if not self.writes:
            return
        try:
            (self.paths.root / "checkpoints").mkdir(parents=True, exist_ok=True)
            ckpt.remove_stale_temporaries(self.paths.last.parent)
            dump_config(cfg, self.paths.config)
            if resumed_from is not None:
                self._record_resume(resumed_from)
                return
            self._set_aside_previous_log()
            info = {"farcluss_version": farcluss.__version__, "git_revision": git_revision(),
                    **info}
            self.paths.run_info.write_text(json.dumps(info, indent=2) + "\n")
        except OSError as exc:
            where = exc.filename or self.paths.root
            raise FarclussError(f"output folder {self.paths.root} is not writable "
                                f"({where}: {exc.strerror or exc})") from None

    def _set_aside_previous_log(self) -> None:
        """A fresh start in a used folder keeps the old log beside the new one, not mixed in."""
        if not self.paths.metrics.is_file():
            return
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(self.paths.metrics.stat().st_mtime))
        target = self.paths.metrics.with_name(f"metrics.{stamp}.jsonl")
        suffix = 1
        while target.exists():
            suffix += 1
            target = self.paths.metrics.with_name(f"metrics.{stamp}-{suffix}.jsonl")
        self.paths.metrics.rename(target)

    def _record_resume(self, resumed_from: int) -> None:
        """Note the resume in run.json and drop log records past the checkpoint.

        The iterations after the checkpoint are replayed exactly, so their records would appear
        twice; the log is rewritten atomically to read as if the run had never stopped.
        """
        try:
            info = json.loads(self.paths.run_info.read_text())
        except (OSError, ValueError):
            info = {}
        info.setdefault("resumed_at", []).append(
            {"iteration": resumed_from, "git_revision": git_revision(),
             "farcluss_version": farcluss.__version__})
        ckpt.write_text_atomic(self.paths.run_info, json.dumps(info, indent=2) + "\n")
        if not self.paths.metrics.is_file():
            return
        kept = []
        for line in self.paths.metrics.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # the half-written last line of a killed run
            if int(record.get("iteration", 0)) <= resumed_from:
                kept.append(line)
        kept.append(json.dumps({"type": "resume", "iteration": resumed_from}))
        ckpt.write_text_atomic(self.paths.metrics, "".join(line + "\n" for line in kept))

    def log(self, record: Dict[str, Any]) -> None:
        """Append one record to metrics.jsonl (and mirror its scalars into TensorBoard)."""
        if not self.writes:
            return
        ckpt.append_line(self.paths.metrics, json.dumps(record))
        if self.tensorboard:
            if self._tensorboard is None:
                self._tensorboard = TensorBoardLogger(self.paths.root / "tensorboard", self.classes)
            self._tensorboard.log(record)
