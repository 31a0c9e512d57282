"""Process-group helpers. Every cross-rank reduction goes through `all_reduce_sum`, which is the
identity in a single process, so loss formulas never ask whether they run under DDP.

What makes W ranks × batch b train like one process × batch W·b: DDP averages the ranks'
gradients, so the ranks' losses must average to the global loss. A mean over pixels divides the
local sum by global count / W (`MeanTeacherMethod.global_count`); a term built from all-reduced
statistics (the batch prototypes) has the same value on every rank, and `all_reduce_sum`
carries its gradient back to every rank's contribution.
"""

from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from farcluss.errors import FarclussError

#: how long a collective waits for the other ranks before the run fails (`train.dist_timeout`)
DEFAULT_TIMEOUT_S = 1800.0

# A second group for the statistics reductions. `all_reduce_sum` may run its collective inside
# the backward pass, where DDP launches its own gradient all-reduces in an order that depends
# on when gradients become ready; one group per purpose keeps the two sequences from pairing
# one rank's bucket with another rank's statistic.
_stats_group: Optional[dist.ProcessGroup] = None


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_from_environment() -> DistEnv:
    """Read RANK/WORLD_SIZE/LOCAL_RANK (torchrun), falling back to SLURM's variables."""
    environ = os.environ
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return DistEnv(
            rank=int(environ["RANK"]),
            world_size=int(environ["WORLD_SIZE"]),
            local_rank=int(environ.get("LOCAL_RANK", 0)),
        )
    if "SLURM_PROCID" in environ and int(environ.get("SLURM_NTASKS", "1")) > 1:
        return DistEnv(
            rank=int(environ["SLURM_PROCID"]),
            world_size=int(environ["SLURM_NTASKS"]),
            local_rank=int(environ.get("SLURM_LOCALID", 0)),
        )
    return DistEnv()


def init_distributed(env: DistEnv, device: torch.device,
                     timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Join the process group (NCCL on CUDA, gloo on CPU); a no-op for one process.

    MASTER_ADDR / MASTER_PORT come from the environment (torchrun sets them; under SLURM export
    the first node's host name), defaulting to 127.0.0.1:29500 for one machine.
    """
    global _stats_group
    if not env.distributed or dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size,
                            timeout=timeout)
    _stats_group = dist.new_group(backend=backend, timeout=timeout)


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Σ_r tensor_r over ranks, as a new tensor; the identity without a process group.

    Differentiable: the backward pass sums the incoming gradient over ranks too, so rank r's
    contribution x_r receives Σ_r' ∂ℓ_r'/∂(Σ x) — every rank's loss, not only its own. With
    DDP's gradient average this gives exactly the single-process gradient of a loss that uses
    the global sum (batch prototypes). Tensors without gradient (counts, confusion matrices)
    take a plain all-reduce. Every rank must reach the same reductions in the same order, in
    the forward and — for tensors that need a gradient — in the backward pass.
    """
    if world_size() == 1:
        return tensor
    if tensor.requires_grad and torch.is_grad_enabled():
        return _AllReduceSum.apply(tensor)
    return _sum_over_ranks(tensor)


def _sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    reduced = tensor.detach().clone(memory_format=torch.contiguous_format)
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM, group=_stats_group)
    return reduced


class _AllReduceSum(torch.autograd.Function):
    """y = Σ_r x_r; the gradient of x_r is Σ_r' ∂ℓ_r'/∂y.

    (torch.distributed.nn.functional.all_reduce does this but is deprecated, and its
    replacement in torch.distributed._functional_collectives has no backward.)
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        return _sum_over_ranks(tensor)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        return _sum_over_ranks(grad_output)


def all_ranks_agree(flag: bool, device: torch.device) -> bool:
    """True when `flag` holds on every rank (a decision all ranks must take together)."""
    if world_size() == 1:
        return flag
    votes = torch.tensor([0.0 if flag else 1.0], device=device)
    dist.all_reduce(votes, op=dist.ReduceOp.SUM, group=_stats_group)
    return bool(votes.item() == 0.0)


def max_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """max_r tensor_r over ranks, as a new tensor (no gradient); the identity without DDP."""
    if world_size() == 1:
        return tensor
    reduced = tensor.detach().clone(memory_format=torch.contiguous_format)
    dist.all_reduce(reduced, op=dist.ReduceOp.MAX, group=_stats_group)
    return reduced


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


class RankLostError(FarclussError):
    """Another rank stopped answering: it died (killed, out of memory) or hangs."""


# what gloo and NCCL say when a peer's connection closes or a collective times out
_LOST_PEER_PATTERNS = ("connection reset", "connection closed", "broken pipe", "timed out",
                       "timeout", "nccl", "gloo", "socket", "peer")


def is_lost_peer(exc: BaseException) -> bool:
    """True for the error a collective raises when another rank is gone."""
    if isinstance(exc, FarclussError):
        return False
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(pattern in text for pattern in _LOST_PEER_PATTERNS)


def lost_rank_error(env: DistEnv, where: str, exc: BaseException,
                    last_checkpoint: Optional[str] = None) -> RankLostError:
    """One line: which rank noticed, which rank is gone (when it can be told), how to go on."""
    message = " ".join((str(exc).splitlines() or [type(exc).__name__])[0].split())
    # gloo's messages end in a paragraph of advice; the first sentence says what happened
    message = message.split(". This is typically")[0][:200]
    if env.world_size == 2:
        lost = f"rank {1 - env.rank} of 2 is gone"
    else:
        lost = f"another of the {env.world_size} ranks is gone"
    resume = (f"; a restart resumes from {last_checkpoint}" if last_checkpoint
              else "; no checkpoint was written yet")
    return RankLostError(f"rank {env.rank} of {env.world_size} stopped {where}: {lost} "
                         f"({message}){resume}")


def report_failure(env: DistEnv, where: str, exc: BaseException) -> None:
    """Tell the user which rank failed, then leave the process group at once.

    The failing process exits right after (the exception propagates); its peers, blocked in a
    collective, fail when its connections close (gloo) or when the collective times out (NCCL,
    `DEFAULT_TIMEOUT_S`). torchrun and `srun --kill-on-bad-exit=1` stop them sooner.
    """
    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    print(f"farcluss: rank {env.rank} of {env.world_size} failed {where}: {message}",
          file=sys.stderr, flush=True)
    abort()


def abort() -> None:
    """Leave the process group without waiting for peers that may never arrive."""
    global _stats_group
    if not (dist.is_available() and dist.is_initialized()):
        return
    _stats_group = None
    try:
        if dist.get_backend() == "nccl":
            # destroy_process_group would wait in NCCL for collectives the peers will not join
            dist.distributed_c10d._abort_process_group()
        else:
            # gloo: closing the connections fails the peers' pending collectives at once
            dist.destroy_process_group()
    except (RuntimeError, ValueError):
        pass


def cleanup() -> None:
    global _stats_group
    _stats_group = None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
