"""torch.distributed helpers: the same code path runs alone or under ``torchrun --nproc_per_node=N``.

gloo on CPU, NCCL on GPU. Metrics are all-reduced as sums so every process sees the global numbers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(device: str = "auto") -> torch.device:
    """``auto`` -> the local CUDA device when there is one, else CPU."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA device is available; use --device cpu")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def init_distributed(device: str = "auto") -> DistContext:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1); otherwise a single process."""
    dev = pick_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(device=dev)
    if not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), device=dev)


def current_context() -> DistContext:
    """The context of an already-initialised process group (single process otherwise)."""
    if dist.is_available() and dist.is_initialized():
        backend = dist.get_backend()
        dev = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), device=dev)
    return DistContext()


def all_reduce_sum(values: list[float], ctx: DistContext) -> list[float]:
    """Sum a list of numbers over all processes (identity for a single process)."""
    if not ctx.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def finish_distributed(ctx: DistContext) -> None:
    """Wait for every process (rank 0 may still be writing files), then leave the process group, so that no
    process exits while the others still talk to it (gloo then aborts with "terminate called")."""
    if ctx.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class GlobalBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of one shuffled order, each global batch split evenly over the processes.

    Plays the role of ``DistributedSampler`` (same ``seed + epoch`` shuffling, ``set_epoch``) without its padding
    duplicates: the union of the processes' batches at step ``i`` is exactly the single-process batch ``i``, so
    with the loss normalised by the global batch count, N processes compute the same gradient as one.
    """

    def __init__(self, size: int, batch_size: int, ctx: DistContext, seed: int = 0, shuffle: bool = True) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.size, self.batch_size, self.ctx, self.seed, self.shuffle = size, batch_size, ctx, seed, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-self.size // self.batch_size)

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.size)
        for start in range(0, self.size, self.batch_size):
            batch = order[start:start + self.batch_size]
            yield batch.tensor_split(self.ctx.world_size)[self.ctx.rank].tolist()
