"""Atomic checkpoint writes, safe loads, and the random-number state a resumed run needs.

A checkpoint is written to a temporary file in the same folder, flushed and fsync'ed, then moved
over the old one with `os.replace`, so a crash at any moment leaves either the old or the new
complete file (a killed write leaves only a hidden ``.NAME.*.tmp`` beside it, which
:func:`remove_stale_temporaries` clears). Every load uses ``weights_only=True``: a file that
needs arbitrary code to unpickle is refused with a :class:`CheckpointError`.
"""

from __future__ import annotations

import errno
import os
import pickle
import random
import re
import secrets
import struct
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch

from farcluss import file_kind
from farcluss.errors import CheckpointError, one_line
from farcluss.log import get_logger

#: called with the temporary file's path after the bytes are handed to the file object and
#: before they are flushed: tests set it to pause (and be killed) in the middle of a write
logger = get_logger(__name__)

_write_hook: Optional[Callable[[Path], None]] = None

_TEMPORARY_SUFFIX = ".tmp"


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _RecordingWriter:
    """A binary file that remembers the OSError of a failed write.

    torch.save reports a failing write as a RuntimeError without the cause ("unexpected pos
    704 vs 598"); the recorded error gives the user the real one (No space left on device).
    """

    def __init__(self, handle):
        self.handle = handle
        self.error: Optional[OSError] = None

    def write(self, data) -> int:
        try:
            return self.handle.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        try:
            self.handle.flush()
        except OSError as error:
            self.error = error
            raise


def _write_error(path: Path, error: OSError, what: str = "") -> "CheckpointError":
    code = errno.errorcode.get(error.errno or 0)
    reason = error.strerror or one_line(error)
    return CheckpointError(f"cannot write {what + ' ' if what else ''}{path}: {reason}"
                           + (f" ({code})" if code else ""))


def _temporary_path(path: Path) -> Path:
    """A hidden name beside `path`, unique per process and write (removed by
    `remove_stale_temporaries` if the write is killed)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{_TEMPORARY_SUFFIX}")


def _replace_with(path: Path, write: Callable[[Any, Path], None]) -> None:
    """Write a temporary file with ``write(handle, tmp_path)``, fsync it and rename it onto
    `path`; on any failure the temporary file goes and `path` is untouched."""
    tmp_path = _temporary_path(path)
    # 0o666 under the umask: the same permissions as any file the user writes
    fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle, tmp_path)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def save_atomic(obj: Any, path: Union[str, Path]) -> None:
    """`torch.save` `obj` to `path` so that `path` is always a complete file.

    Raises :class:`CheckpointError` naming `path` and the OS error (a full disk, an I/O error,
    no permission) when the file cannot be written; the old file is then untouched and the
    temporary file removed.
    """
    path = Path(path)
    writer: Optional[_RecordingWriter] = None

    def write(handle, tmp_path: Path) -> None:
        nonlocal writer
        writer = _RecordingWriter(handle)
        torch.save(obj, writer)
        if _write_hook is not None:
            _write_hook(tmp_path)
        writer.flush()

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _replace_with(path, write)
    except OSError as error:
        raise _write_error(path, error, "checkpoint") from None
    except RuntimeError:
        # torch.save wraps the OSError of a failed write in a RuntimeError
        if writer is not None and writer.error is not None:
            raise _write_error(path, writer.error, "checkpoint") from None
        raise
    _fsync_dir(path.parent)


def append_line(path: Union[str, Path], line: str) -> None:
    """Append one line to a log file; on failure the file is cut back to its previous end.

    A half-written record would otherwise stay behind a full disk; the error names the file.
    """
    path = Path(path)
    data = (line.rstrip("\n") + "\n").encode("utf-8")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    except OSError as error:
        raise _write_error(path, error) from None
    try:
        end = os.lseek(fd, 0, os.SEEK_END)
        try:
            written = 0
            while written < len(data):
                written += os.write(fd, data[written:])
        except OSError as error:
            try:
                os.ftruncate(fd, end)
            except OSError:
                pass
            raise _write_error(path, error) from None
    finally:
        os.close(fd)


def write_text_atomic(path: Union[str, Path], text: str) -> None:
    """Replace a small text file (a log, run.json) at once: a failed write leaves the old one."""
    path = Path(path)
    try:
        _replace_with(path, lambda handle, _: handle.write(text.encode("utf-8")))
    except OSError as error:
        raise _write_error(path, error) from None


def remove_stale_temporaries(folder: Union[str, Path]) -> list:
    """Delete the temporary files of writes that were killed before their `os.replace`."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for stale in folder.glob(f".*{_TEMPORARY_SUFFIX}"):
        if stale.is_file():
            stale.unlink(missing_ok=True)
            removed.append(stale)
    return removed


def _refusal_reason(message: str) -> str:
    """The useful part of torch's weights-only refusal (the global it would have imported)."""
    found = re.search(r"GLOBAL\s+([\w.]+)", message)
    if found:
        return f"unpickling it would import {found.group(1)}"
    found = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", message)
    if found:
        return found.group(1).strip().rstrip(".")
    return "it holds objects other than tensors and plain containers"


# ---- reading a user's file ----------------------------------------------------------------------
def _zip_problem(path: Path) -> Optional[str]:
    """What is wrong with a zip-format torch file, in plain words; None when it is intact.

    Every member's CRC-32 is checked: torch itself does not, so a flipped byte inside a tensor
    would otherwise load without a word.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            bad_member = archive.testzip()
    except zipfile.BadZipFile as error:
        if "not a zip file" in str(error).lower():
            # the directory at the end of every zip file is missing: the write was cut short
            return "truncated (the end of the file is missing)"
        return f"corrupt ({one_line(error)})"
    except (OSError, EOFError, ValueError, NotImplementedError, RuntimeError,
            zlib.error, struct.error, KeyError, IndexError, OverflowError) as error:
        return f"truncated or corrupt ({one_line(error)})"
    if bad_member is not None:
        return f"corrupt (checksum mismatch in {bad_member})"
    if not any(name.endswith("data.pkl") for name in names):
        return "a zip archive, not a PyTorch file"
    return None


def read_torch_file(path: Union[str, Path], what: str = "checkpoint",
                    expected: str = "a farcluss checkpoint", map_location: Any = "cpu") -> Any:
    """``torch.load(weights_only=True)`` of a user's file; every failure a one-line CheckpointError.

    `what` names the file's role ("checkpoint", "pretrained weights"), `expected` what it should
    be. The message says what is wrong in plain words — empty, truncated, corrupt (a CRC-32
    mismatch), a text file or an image instead of a checkpoint, unsafe to unpickle — whatever
    exception the reader raised.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}")
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(file_kind.HEAD_BYTES)
    except OSError as error:
        raise CheckpointError(f"cannot read {what} {path}: "
                              f"{error.strerror or one_line(error)}") from None

    def refuse(problem: str) -> CheckpointError:
        return CheckpointError(f"{what} {path} is {problem}")

    if size == 0:
        raise refuse("empty (0 bytes)")
    if head.startswith(file_kind.ZIP_MAGIC):
        problem = _zip_problem(path)
        if problem is not None:
            raise refuse(problem)
    elif not head.startswith(b"\x80"):  # a pickle (torch's legacy format) starts with PROTO
        kind = file_kind.describe(head)
        raise refuse(f"{kind}, not {expected}" if kind else
                     f"not {expected} (not a PyTorch file: unrecognised content)")
    try:
        with warnings.catch_warnings():
            # a foreign pickle protocol is reported by the refusal below, if it matters at all
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            warnings.filterwarnings("ignore", category=UserWarning)
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        message = str(error)
        if "Weights only load failed" in message:
            raise CheckpointError(f"refusing to load {path}: not a plain tensor checkpoint "
                                  f"({_refusal_reason(message)})") from None
        raise refuse(f"corrupt ({one_line(error)})") from None
    except MemoryError:
        raise refuse("corrupt (it asks for more memory than there is)") from None
    except Exception as error:  # noqa: BLE001 - whatever a damaged file makes the reader raise
        if isinstance(error, OSError) and error.errno not in (None, errno.EINVAL):
            raise CheckpointError(f"cannot read {what} {path}: "
                                  f"{error.strerror or one_line(error)}") from None
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        reason = " ".join(reason.split())[:200]
        legacy = "" if head.startswith(file_kind.ZIP_MAGIC) else "legacy PyTorch format, "
        raise refuse(f"truncated or corrupt ({legacy}{reason})") from None


def _check_run_entries(state: dict, path: Path) -> None:
    """The entries every farcluss checkpoint shares have the types the readers expect.

    A damaged file can unpickle into any structure; finding that here keeps a ``TypeError``
    from surfacing later, far from the file.
    """
    def is_state_dict(value: Any) -> bool:
        return isinstance(value, dict) and all(
            isinstance(key, str) and isinstance(tensor, torch.Tensor) for key, tensor in value.items())

    checks = {
        "config": lambda value: isinstance(value, dict),
        "classes": lambda value: isinstance(value, list) and all(isinstance(c, str) for c in value),
        "student": is_state_dict,
        "teacher": lambda value: value is None or is_state_dict(value),
        "iteration": lambda value: isinstance(value, int) and not isinstance(value, bool) and value >= 0,
        "optimizer": lambda value: isinstance(value, dict) and isinstance(value.get("state"), dict)
        and isinstance(value.get("param_groups"), list),
        "rank_states": lambda value: isinstance(value, list) and len(value) > 0 and all(
            isinstance(entry, dict) and isinstance(entry.get("rng"), dict)
            and isinstance(entry.get("method"), dict) for entry in value),
    }
    for key, check in checks.items():
        if key in state and not check(state[key]):
            raise CheckpointError(f"checkpoint {path} is corrupt or not a farcluss checkpoint: "
                                  f"its '{key}' entry is a {type(state[key]).__name__} of the "
                                  "wrong form")


def load_checkpoint(path: Union[str, Path], map_location: Any = "cpu") -> dict:
    """Load a checkpoint with ``weights_only=True``; refuse anything else with a clear error."""
    path = Path(path)
    obj = read_torch_file(path, "checkpoint", "a farcluss checkpoint", map_location=map_location)
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a dict: "
                              "not a farcluss checkpoint")
    _check_run_entries(obj, path)
    return obj


def load_model_state(model: torch.nn.Module, state: dict, source: str) -> None:
    """Strict load naming every missing/unexpected key and shape mismatch."""
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {source} holds a {type(state).__name__} where a "
                              "state dict was expected")
    own = model.state_dict()
    mismatched = [
        f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(own[key].shape)}"
        for key, value in state.items()
        if key in own and hasattr(value, "shape") and tuple(value.shape) != tuple(own[key].shape)
    ]
    if mismatched:
        raise CheckpointError(
            f"checkpoint {source} does not fit the model (shape mismatch): " + "; ".join(mismatched[:5])
            + (f" (+{len(mismatched) - 5} more)" if len(mismatched) > 5 else "")
        )
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append("missing " + ", ".join(missing[:8]) + (" …" if len(missing) > 8 else ""))
        if unexpected:
            parts.append("unexpected " + ", ".join(unexpected[:8]) + (" …" if len(unexpected) > 8 else ""))
        raise CheckpointError(f"checkpoint {source} does not fit the model: " + "; ".join(parts))
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, ValueError) as error:  # e.g. a damaged entry's dtype
        raise CheckpointError(f"checkpoint {source} does not fit the model: "
                              f"{one_line(error)[:300]}") from None


# ---- random-number state ----------------------------------------------------------------------
def capture_rng_state() -> dict:
    """The global Python, NumPy, torch and CUDA generator states, as tensors and plain values.

    Everything is a type ``weights_only`` loading accepts (the NumPy key array becomes an int64
    tensor), so a resumed run can restore them without trusting pickled objects.
    """
    python_version, python_internal, python_gauss = random.getstate()
    numpy_kind, numpy_keys, numpy_pos, numpy_has_gauss, numpy_gauss = np.random.get_state()
    state = {
        "python": {"version": python_version, "internal": list(python_internal),
                   "gauss_next": python_gauss},
        "numpy": {"kind": str(numpy_kind), "keys": torch.from_numpy(numpy_keys.astype(np.int64)),
                  "pos": int(numpy_pos), "has_gauss": int(numpy_has_gauss),
                  "cached_gaussian": float(numpy_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of :func:`capture_rng_state`; entries a checkpoint lacks are left alone."""
    if "python" in state:
        python = state["python"]
        random.setstate((int(python["version"]), tuple(int(v) for v in python["internal"]),
                         python["gauss_next"]))
    if "numpy" in state:
        numpy_state = state["numpy"]
        np.random.set_state((numpy_state["kind"],
                             numpy_state["keys"].numpy().astype(np.uint32),
                             int(numpy_state["pos"]), int(numpy_state["has_gauss"]),
                             float(numpy_state["cached_gaussian"])))
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            logger.warning(f"the checkpoint holds {len(cuda_states)} CUDA generator states but "
                           f"{torch.cuda.device_count()} devices are visible; CUDA randomness "
                           "will not replay exactly")
