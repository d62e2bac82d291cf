"""Data-parallel training under torchrun: the process group and the few collectives the loop needs.

`torchrun --nproc_per_node=N -m training.run ...` sets WORLD_SIZE, RANK and LOCAL_RANK; then every process
joins one group (NCCL on cuda:LOCAL_RANK where CUDA is available, gloo on CPU otherwise). Without those
variables a run is one process with no group, and every collective below is a no-op.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class Dist:
    """This process's place in the run: rank, world size and the device its replica lives on."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    group: bool = False  # a process group exists (torchrun), even with a world size of 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the checkpoints, grids, logs and export; the other ranks only train."""
        return self.rank == 0

    def wrap(self, module: nn.Module) -> nn.Module:
        """`module` under DDP, or itself without a process group."""
        if not self.group:
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        # forward_sync_buffers=False (formerly broadcast_buffers=False): D(real) and D(fake) run before one
        # backward, and DDP's per-forward broadcast overwrites the BatchNorm statistics in place in between,
        # which cuDNN's BatchNorm backward rejects (pytorch/pytorch#175024); it would also keep only rank 0's
        # statistics. Ranks keep their own instead; `average_buffers` makes them agree after every iteration.
        return DistributedDataParallel(module, device_ids=ids, forward_sync_buffers=False)

    def any(self, flag: bool) -> bool:
        """True on every rank if `flag` is true on any rank: all ranks act on a stop request together."""
        if not self.group:
            return flag
        t = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    @torch.no_grad()
    def average_(self, tensors: Iterable[torch.Tensor]) -> None:
        """Replace each floating-point tensor by its mean over the ranks, in one collective."""
        ts = [t for t in tensors if t.is_floating_point()]
        if not self.group or self.world_size == 1 or not ts:
            return
        flat = torch.cat([t.reshape(-1).to(torch.float64) for t in ts])
        dist.all_reduce(flat)
        flat /= self.world_size
        for t, v in zip(ts, flat.split([t.numel() for t in ts]), strict=True):
            t.copy_(v.view_as(t))

    def average_buffers(self, *modules: nn.Module) -> None:
        """Make the modules' floating-point buffers (BatchNorm statistics) the mean over the ranks."""
        self.average_(b for m in modules for b in m.buffers())

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Per-key mean over the ranks (statistics of each rank's share of the global batch)."""
        if not self.group or self.world_size == 1:
            return values
        t = torch.tensor(list(values.values()), dtype=torch.float64, device=self.device)
        dist.all_reduce(t)  # every rank built `values` the same way, so the keys line up
        return {k: v / self.world_size for k, v in zip(values, t.tolist(), strict=True)}

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj` (picklable), in rank order, on every rank."""
        if not self.group:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.group:
            dist.barrier()


def current() -> Dist:
    """The running process's Dist: from torch.distributed's group if one was joined, else single-process."""
    if not dist.is_available() or not dist.is_initialized():
        return Dist()
    nccl = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    return Dist(dist.get_rank(), dist.get_world_size(), device, group=True)


@contextlib.contextmanager
def process_group() -> Iterator[Dist]:
    """Join torchrun's process group for the duration (if launched by torchrun) and yield this process's Dist."""
    if "WORLD_SIZE" not in os.environ:
        yield Dist()
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    try:
        yield current()
    finally:
        dist.destroy_process_group()


def state_digest(states: Iterable[Any]) -> str:
    """sha256 over every tensor in nested dicts/lists, in order: equal digests mean bit-identical replicas."""
    h = hashlib.sha256()

    def walk(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            h.update(obj.detach().reshape(-1).cpu().contiguous().view(torch.uint8).numpy().tobytes())
        elif isinstance(obj, dict):
            for k, v in obj.items():
                h.update(str(k).encode())
                walk(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v)
        else:
            h.update(repr(obj).encode())

    for s in states:
        walk(s)
    return h.hexdigest()
