"""Real sparse kernels for non-structured pruning, so its speed can be measured rather than assumed.

ADMM-NN-S (Ma et al. 2019, arXiv 1907.02124) compares non-structured and structured pruning by *measured* speed.
Here a pruned Linear layer runs as a torch CSR sparse-dense matrix product, and a pruned Conv2d as convolution
lowered to GEMM (im2col by ``F.unfold``, then the CSR product), the form sparse convolution libraries use on CPU.
:func:`to_sparse_kernels` converts a masked model; :func:`break_even_sparsity` measures, on this machine, from
which sparsity the CSR kernel beats the dense one for a given layer shape.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.measurement.metrics import measure_latency


def _csr(matrix: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():  # torch marks CSR support as beta on every conversion
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return matrix.detach().to_sparse_csr()


class SparseLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` stored in CSR (inference only)."""

    def __init__(self, layer: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.register_buffer("weight", _csr(layer.weight))
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        y = torch.sparse.mm(self.weight, flat.T).T
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


class SparseConv2d(nn.Module):
    """Convolution as im2col + CSR GEMM (groups=1), inference only."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"sparse conv kernels need groups=1 and explicit zero padding, got {conv}")
        self.out_channels, self.kernel_size = conv.out_channels, conv.kernel_size
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.register_buffer("weight", _csr(conv.weight.reshape(conv.out_channels, -1)))
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)  # (N, C*k*k, L)
        oh = (h + 2 * self.padding[0] - self.dilation[0] * (self.kernel_size[0] - 1) - 1) // self.stride[0] + 1
        ow = (w + 2 * self.padding[1] - self.dilation[1] * (self.kernel_size[1] - 1) - 1) // self.stride[1] + 1
        gemm = torch.sparse.mm(self.weight, cols.transpose(0, 1).reshape(cols.shape[1], -1))  # (out, N*L)
        y = gemm.reshape(self.out_channels, n, oh, ow).transpose(0, 1)
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1, 1)
        return y.contiguous()


def to_sparse_kernels(model: nn.Module, min_sparsity: float = 0.0) -> nn.Module:
    """A copy of ``model`` (eval) whose Linear/Conv2d layers with at least ``min_sparsity`` zero weights run on
    CSR kernels; other layers stay dense."""
    out = copy.deepcopy(model).eval()
    for name, module in list(out.named_modules()):
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        if isinstance(module, nn.Conv2d) and (module.groups != 1 or isinstance(module.padding, str)):
            continue
        sparsity = float((module.weight == 0).double().mean())
        if sparsity < min_sparsity or sparsity == 0.0:
            continue
        replacement = SparseLinear(module) if isinstance(module, nn.Linear) else SparseConv2d(module)
        parent_name, _, child = name.rpartition(".")
        setattr(out.get_submodule(parent_name) if parent_name else out, child, replacement)
    return out


@dataclass
class BreakEven:
    """Dense vs CSR latency of one layer shape over sparsities, and the first sparsity at which CSR wins."""

    shape: tuple[int, int]
    batch: int
    sparsities: list[float]
    dense_ms: float
    sparse_ms: list[float]

    @property
    def break_even(self) -> float | None:
        for s, ms in zip(self.sparsities, self.sparse_ms):
            if ms < self.dense_ms:
                return s
        return None


def break_even_sparsity(out_features: int, in_features: int, batch: int = 64,
                        sparsities: tuple[float, ...] = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995),
                        min_run_time: float = 0.2, seed: int = 0) -> BreakEven:
    """Measure a Linear layer ``out x in`` at ``batch``: dense kernel once, CSR kernel at each sparsity (random
    unstructured masks)."""
    g = torch.Generator().manual_seed(seed)
    dense = nn.Linear(in_features, out_features)
    shape = (in_features,)
    dense_ms = measure_latency(dense, shape, batch, min_run_time=min_run_time).median_ms
    sparse_ms = []
    for s in sparsities:
        layer = nn.Linear(in_features, out_features)
        with torch.no_grad():
            layer.weight.mul_((torch.rand(layer.weight.shape, generator=g) >= s).float())
        sparse_ms.append(measure_latency(SparseLinear(layer), shape, batch, min_run_time=min_run_time).median_ms)
    return BreakEven((out_features, in_features), batch, list(sparsities), dense_ms, sparse_ms)
