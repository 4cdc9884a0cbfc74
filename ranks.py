"""goose's one torchrun helper: this process's place among the ranks, and the few collectives both stages use.

torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; the process group is NCCL on CUDA
and gloo on CPU. One process (no WORLD_SIZE, or 1) runs the same code with every collective a no-op. Rank 0
is the only writer (a store's metadata, checkpoints, logs, best/).

`sum_over_ranks_` and `mean_over_ranks(_)` work on the process group alone, for code that has no `Ranks` at
hand (the student's running spike statistics, the alignment loss's channel statistics): under data
parallelism they make a statistic the global batch's, so N ranks train exactly as one process would.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import GooseError


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def sum_over_ranks_(t: torch.Tensor) -> torch.Tensor:
    """In place: the sum over ranks."""
    if _world() > 1:
        dist.all_reduce(t)
    return t


def mean_over_ranks_(t: torch.Tensor) -> torch.Tensor:
    """In place: the mean over ranks (every rank holds an equal share of the global batch)."""
    world = _world()
    if world > 1:
        dist.all_reduce(t)
        t /= world
    return t


def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The mean over ranks, leaving `t` as it is (t itself in one process)."""
    return mean_over_ranks_(t.clone()) if _world() > 1 else t


@dataclass
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @classmethod
    def join(cls, device_type: str, timeout: datetime.timedelta | None = None) -> "Ranks":
        """Join torchrun's process group when WORLD_SIZE > 1 (once per process): nccl on CUDA, gloo on CPU.
        `timeout`: how long a collective waits (stage one: hours, since a rank that finished its share waits
        at the barrier for the slowest); torch's default otherwise."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        ranks = cls(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl" if device_type == "cuda" else "gloo"
        try:
            if backend == "nccl":
                torch.cuda.set_device(ranks.local_rank)
            if not dist.is_initialized():
                dist.init_process_group(backend, **({"timeout": timeout} if timeout is not None else {}))
        except (RuntimeError, ValueError) as exc:  # a bad LOCAL_RANK, an unreachable master: one line
            raise GooseError(f"cannot join the torchrun process group ({backend}): "
                             f"{str(exc).splitlines()[0]}") from None
        return ranks

    def device(self, device: torch.device) -> torch.device:
        """Under torchrun a CUDA device means this rank's own GPU, cuda:LOCAL_RANK."""
        if self.active and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    # ---- collectives (no-ops in one process) ----------------------------------------------------
    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """Elementwise mean over ranks."""
        if not self.active:
            return values
        out = values.clone()
        dist.all_reduce(out)
        return out / self.world

    def all_true(self, flag: bool, device) -> bool:
        """True only if `flag` is true on every rank (e.g. a finite loss: all ranks skip together)."""
        return self._reduce_flag(flag, device, dist.ReduceOp.MIN)

    def any_true(self, flag: bool, device) -> bool:
        """True if `flag` is true on some rank (e.g. a signal: all ranks stop together)."""
        return self._reduce_flag(flag, device, dist.ReduceOp.MAX)

    def _reduce_flag(self, flag: bool, device, op) -> bool:
        if not self.active:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t, op=op)
        return bool(t.item() > 0.5)

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank (any picklable value; also a barrier)."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        """Every rank's `obj`, on every rank, in rank order."""
        if not self.active:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def total(self, value: int) -> int:
        """The sum of a number over ranks (also a barrier)."""
        return sum(self.gather(value))

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def sync_grads(self, params) -> None:
        """Average the gradients of parameters outside the DDP module (CTKD temperature, projectors)."""
        if not self.active:
            return
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= self.world

    def close(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()
