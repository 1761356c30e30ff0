"""Data parallelism under torchrun: a rank's place in the group and the few collectives the loop needs.

Under torchrun (WORLD_SIZE > 1) every rank holds a whole replica of the model
and of the optimizer. After a step's micro-batches the gradients are summed
across ranks (one all-reduce per bucket), every rank takes the same optimizer
step on the same sums, and the replicas stay bitwise equal. NCCL carries the
gradients on CUDA, gloo on the CPU. Small agreements (stop at this step? out of
memory anywhere?) go through a gloo group; the checkpoint writer's thread has a
gloo group of its own, because the collectives of one group must be issued in
the same order on every rank, and two threads sharing one would race.

A peer that dies makes the next collective raise (gloo sees the connection
close); one that hangs makes it raise after NANOD_DIST_TIMEOUT seconds
(default 1800), so a group never waits forever on its own. Under nanod the
stall rule usually acts first.

One process (no torchrun, or WORLD_SIZE=1) gets the same object with every
collective a no-op, so the loop has one code path. Which rows a rank trains on
is train.py's choice; what a rank saves is checkpoint.py's.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch

DEFAULT_TIMEOUT_S = 1800.0
BUCKET_ELEMENTS = 1 << 22   # 16 MiB of float32 per all-reduce: few calls, and little extra memory


@dataclass
class Group:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None
    backend: str | None = None
    _ctrl: object = None     # gloo group: flags and barriers, from the training loop's thread
    _save: object = None     # gloo group: the checkpoint writer's thread only

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, env=os.environ) -> "Group":
        """The rank torchrun gave this process (rank 0 of 1 without torchrun). Raises ValueError."""
        def num(name: str, default: int) -> int:
            value = env.get(name, "").strip()
            if not value:
                return default
            try:
                return int(value)
            except ValueError:
                raise ValueError(f"{name}={value!r} is not an integer") from None
        world = num("WORLD_SIZE", 1)
        rank, local = num("RANK", 0), num("LOCAL_RANK", 0)
        if world < 1 or not 0 <= rank < world or not 0 <= local < world:
            raise ValueError(f"RANK={rank} LOCAL_RANK={local} WORLD_SIZE={world} do not describe a rank")
        return cls(rank=rank, world_size=world, local_rank=local)

    def start(self, device_type: str) -> "Group":
        """Pick this rank's device and join the group (every rank must call it)."""
        self.device = pick_device(device_type, self.local_rank if self.active else None)
        if not self.active:
            return self
        import torch.distributed as dist
        self.backend = "nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(self.backend, timeout=timedelta(seconds=timeout_s()))
        self._ctrl = dist.group.WORLD if self.backend == "gloo" else dist.new_group(backend="gloo")
        self._save = dist.new_group(backend="gloo")
        return self

    def close(self) -> None:
        if self.active:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()

    # ---- agreements (the training loop's thread) ------------------------------------------
    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on any rank."""
        if not self.active:
            return bool(flag)
        import torch.distributed as dist
        t = torch.tensor([1 if flag else 0], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._ctrl)
        return bool(t.item())

    def all(self, flag: bool) -> bool:
        return not self.any(not flag)

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist
            dist.barrier(group=self._ctrl)

    # ---- the replicas ----------------------------------------------------------------------
    def broadcast_(self, tensors: list[torch.Tensor]) -> None:
        """Rank 0's values on every rank (the replicas start equal, whatever each rank loaded)."""
        if not self.active:
            return
        import torch.distributed as dist
        with torch.no_grad():
            for t in tensors:
                dist.broadcast(t, src=0)

    def sum_(self, tensors: list[torch.Tensor]) -> None:
        """Each tensor replaced by its sum over the ranks, in place, a bucket of them per all-reduce.

        Every rank ends with the same bits: the reduction of each element is done
        once and shared, and for two ranks a + b == b + a exactly.
        """
        if not self.active or not tensors:
            return
        import torch.distributed as dist
        for bucket in _buckets(tensors):
            flat = torch.cat([t.reshape(-1) for t in bucket])
            dist.all_reduce(flat)
            offset = 0
            for t in bucket:
                n = t.numel()
                t.copy_(flat[offset:offset + n].view_as(t))
                offset += n

    # ---- the checkpoint writer's thread ------------------------------------------------------
    def all_in_writer(self, ok: bool) -> bool:
        """`all` over the writer threads' own group: every rank's files are on disk (or not)."""
        if not self.active:
            return bool(ok)
        import torch.distributed as dist
        t = torch.tensor([1 if ok else 0], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self._save)
        return bool(t.item())


def _buckets(tensors: list[torch.Tensor]):
    bucket, size = [], 0
    for t in tensors:
        if bucket and (size + t.numel() > BUCKET_ELEMENTS or t.dtype != bucket[0].dtype
                       or t.device != bucket[0].device):
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += t.numel()
    if bucket:
        yield bucket


def pick_device(device_type: str, local_rank: int | None = None) -> torch.device:
    """cuda (this rank's GPU: LOCAL_RANK among the visible ones) when available, else cpu."""
    kind = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda" and local_rank is not None:
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(kind)


def timeout_s() -> float:
    try:
        value = float(os.environ.get("NANOD_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    except ValueError:
        raise ValueError(f"NANOD_DIST_TIMEOUT={os.environ['NANOD_DIST_TIMEOUT']!r} is not a number of seconds") from None
    if not value > 0:
        raise ValueError(f"NANOD_DIST_TIMEOUT={value:g} must be positive")
    return value
