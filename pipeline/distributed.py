"""Stage two under torchrun: the process group from the environment, and the few collectives the trainer
needs. One process (no WORLD_SIZE, or 1) is the same code with every collective a no-op.

torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; the process group is NCCL on
CUDA and gloo on CPU. Rank 0 is the only writer (checkpoints, logs, TensorBoard, best/); every rank reads
the store and its own share of every global batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import GooseError


@dataclass
class DistEnv:
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
    def from_env(cls, device_kind: str) -> "DistEnv":
        """Join torchrun's process group when WORLD_SIZE > 1 (once per process)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if not dist.is_initialized():
            backend = "nccl" if device_kind == "cuda" else "gloo"
            try:
                if backend == "nccl":
                    torch.cuda.set_device(local_rank)
                dist.init_process_group(backend)
            except (RuntimeError, ValueError) as exc:
                raise GooseError(f"cannot join the torchrun process group ({backend}): "
                                 f"{str(exc).splitlines()[0]}") from None
        return cls(rank=rank, world=world, local_rank=local_rank)

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
        """Rank 0's `obj` on every rank (picklable values: validation results)."""
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

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def sync_grads(self, params) -> None:
        """Average gradients of parameters outside the DDP module (CTKD temperature, projectors)."""
        if not self.active:
            return
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= self.world

