"""Run by test_curvature under torchrun: each process collects K-FAC factors on its half of every batch and
rank 0 saves the all-reduced result (``python kfac_worker.py OUT``)."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

from prunekit.curvature.kfac import CurvatureConfig, FisherType, collect_diagonal_fisher, collect_kfac


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 5 * 5, 4))


def batches(rank: int = 0, world: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(2):
        x, y = torch.randn(8, 2, 5, 5, generator=g), torch.randint(0, 4, (8,), generator=g)
        out.append((x[rank::world], y[rank::world]))
    return out


def collect(rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]:
    cfg = CurvatureConfig(fisher=FisherType.EMPIRICAL, batches=2)
    model = tiny_model()
    factors = collect_kfac(model, batches(rank, world), cfg)
    diag = collect_diagonal_fisher(model, batches(rank, world), cfg)
    return {"A": factors["0"].A, "G": factors["0"].G, "A3": factors["3"].A, "G3": factors["3"].G, "D": diag["0"]}


if __name__ == "__main__":
    dist.init_process_group("gloo")
    result = collect(dist.get_rank(), dist.get_world_size())
    if dist.get_rank() == 0:
        save_file({k: v.contiguous() for k, v in result.items()}, sys.argv[1])
    dist.destroy_process_group()
