"""Device and precision resolution: the one place that turns `train.device` and `train.amp`
into a torch device, an autocast mode and backend settings. Every command uses it (train,
eval, predict, bench)."""

from __future__ import annotations

import contextlib
import os

import torch

from farcluss.engine.distributed import DistEnv
from farcluss.errors import ConfigError


def resolve_device(name: str, env: DistEnv) -> torch.device:
    """`train.device` → a device: `auto` is this rank's GPU (`cuda:LOCAL_RANK`) or the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", env.local_rank)
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"config key 'train.device' is {name} but CUDA is not available")
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", env.local_rank)
    return device


def _cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX: bf16 matrix products run ~2.5x faster than fp32 there; elsewhere
    they are emulated and slower, so `auto` keeps fp32."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            flags = handle.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_amp(amp: str, device: torch.device) -> str:
    """`train.amp` in force: `auto` is bf16 on a CPU that runs it natively, else off; fp16
    needs CUDA (its GradScaler does)."""
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError("config key 'train.amp' is fp16, which needs CUDA; use bf16 on CPU")
    if amp != "auto":
        return amp
    # on CUDA the published recipes are fp32; bf16/fp16 there is an explicit choice
    if device.type == "cuda":
        return "off"
    return "bf16" if _cpu_has_native_bf16() else "off"


def autocast_context(device: torch.device, amp: str):
    """The autocast region of a forward pass for a resolved `amp` (a no-op for `off`)."""
    if amp == "off":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def configure_backends(device: torch.device, deterministic: bool) -> None:
    """`train.deterministic`: deterministic kernels (and cuBLAS workspace) for bitwise reruns;
    otherwise cuDNN may pick the fastest convolution algorithm on CUDA."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
