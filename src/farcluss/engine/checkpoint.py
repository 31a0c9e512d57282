"""Atomic checkpoint writes, safe loads, and the random-number state a resumed run needs.

A checkpoint is written to a temporary file in the same folder, flushed and fsync'ed, then moved
over the old one with `os.replace`, so a crash at any moment leaves either the old or the new
complete file (a killed write leaves only a hidden ``.NAME.*.tmp`` beside it, which
:func:`remove_stale_temporaries` clears). Every load uses ``weights_only=True``: a file that
needs arbitrary code to unpickle is refused with a :class:`CheckpointError`.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import secrets
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch

from farcluss.errors import CheckpointError, one_line

#: called with the temporary file's path after the bytes are handed to the file object and
#: before they are flushed: tests set it to pause (and be killed) in the middle of a write
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


def save_atomic(obj: Any, path: Union[str, Path]) -> None:
    """`torch.save` `obj` to `path` so that `path` is always a complete file.

    Raises :class:`CheckpointError` (naming `path`) when the folder cannot be written.
    """
    path = Path(path)
    tmp_path = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{_TEMPORARY_SUFFIX}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # 0o666 under the umask: the same permissions as any file the user writes
        fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as handle:
                torch.save(obj, handle)
                if _write_hook is not None:
                    _write_hook(tmp_path)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp_path, path)
        except BaseException:
            tmp_path.unlink(missing_ok=True)
            raise
    except OSError as error:
        raise CheckpointError(f"cannot write checkpoint {path}: "
                              f"{error.strerror or one_line(error)}") from None
    _fsync_dir(path.parent)


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


def load_checkpoint(path: Union[str, Path], map_location: Any = "cpu") -> dict:
    """Load a checkpoint with ``weights_only=True``; refuse anything else with a clear error."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():
            # a foreign pickle protocol is reported by the refusal below, if it matters at all
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        message = str(error)
        if "Weights only load failed" in message:
            raise CheckpointError(f"refusing to load {path}: not a plain tensor checkpoint "
                                  f"({_refusal_reason(message)})") from None
        raise CheckpointError(f"cannot read checkpoint {path}: {one_line(error)}") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as error:
        # a truncated zip, a text file, an I/O error: torch's first line says which
        text = str(error).strip()
        reason = text.splitlines()[0] if text else type(error).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: {reason}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a dict")
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
    model.load_state_dict(state)


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
            warnings.warn(f"the checkpoint holds {len(cuda_states)} CUDA generator states but "
                          f"{torch.cuda.device_count()} devices are visible; CUDA randomness "
                          "will not replay exactly", stacklevel=2)
