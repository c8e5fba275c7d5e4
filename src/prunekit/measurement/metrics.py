"""Honest measurement: parameters, FLOPs/MACs (``torch.utils.flop_counter``), latency
(``torch.utils.benchmark``), weight storage bits, accuracy.

>>> from prunekit.models import create_model
>>> from prunekit.measurement.metrics import count_params, count_flops
>>> m = create_model("lenet300", in_channels=1, input_size=28)
>>> count_params(m)
266610
>>> count_flops(m, (1, 1, 28, 28)) == 2 * (784 * 300 + 300 * 100 + 100 * 10)
True
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from prunekit.data import DataSplits
from prunekit.measurement.latency import Latency, check_latency_settings, measure_latency  # noqa: F401
from prunekit.training import evaluate


def count_params(model: nn.Module, nonzero_only: bool = False) -> int:
    """Number of parameters (each shared tensor once); ``nonzero_only`` counts entries that are not zero."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += int(torch.count_nonzero(p)) if nonzero_only else p.numel()
    return total


def _forward_for_counting(model: nn.Module, inputs: tuple[int, ...] | Any) -> None:
    """Run ``model`` once on zeros of a shape (a tuple of ints, batch included) or on example inputs (a tensor, a
    tuple of positional or a dict of keyword arguments)."""
    from prunekit.channels.model_io import call_model

    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the fused kernel of nn.MultiheadAttention goes uncounted
    try:
        if isinstance(inputs, (tuple, list)) and inputs and all(isinstance(v, int) for v in inputs):
            model(torch.zeros(tuple(inputs), device=next(model.parameters()).device))
        else:
            call_model(model, inputs)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def count_flops(model: nn.Module, input_shape: tuple[int, ...] | Any) -> int:
    """Forward FLOPs for one input of ``input_shape`` (batch included), counted by ``FlopCounterMode``; example
    inputs (a tensor, a tuple, a dict of keyword tensors such as ``input_ids``) may be given instead of a shape.

    Matrix products and convolutions count 2 FLOPs per multiply-accumulate (so MACs = FLOPs / 2);
    element-wise ops are not counted, as is customary in the pruning literature.
    """
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        _forward_for_counting(model, input_shape)
    model.train(was_training)
    return int(counter.get_total_flops())


def flops_by_module(model: nn.Module, input_shape: tuple[int, ...] | Any) -> dict[str, int]:
    """Forward FLOPs per module name (``""`` is the whole model; parents include their children); a shape or
    example inputs, as :func:`count_flops`."""
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        _forward_for_counting(model, input_shape)
    model.train(was_training)
    root = type(model).__name__
    out: dict[str, int] = {}
    for name, by_op in counter.get_flop_counts().items():
        if name == "Global":
            continue
        key = "" if name == root else name.removeprefix(root + ".")
        out[key] = int(sum(by_op.values()))
    return out


def storage_bits(model: nn.Module) -> int:
    """Bits needed to store every parameter densely at its dtype (no index, no compression)."""
    seen: set[int] = set()
    bits = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            bits += p.numel() * p.element_size() * 8
    return bits


@dataclass(frozen=True)
class ModelSummary:
    """The numbers every prunekit report compares: size, cost, speed and accuracy."""

    params: int
    flops: int
    storage_bits: int
    latency_ms_b1: float
    latency_ms_b64: float
    threads: int
    val_acc: float | None = None
    test_acc: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(model: nn.Module, data: DataSplits | None = None, input_shape: tuple[int, ...] | None = None,
              latency: bool = True, min_run_time: float = 0.5) -> ModelSummary:
    """Measure ``model``: parameters, FLOPs at batch 1, storage, latency at batch 1 and 64, accuracy."""
    if input_shape is None:
        if data is None:
            raise ValueError("summarize needs data or input_shape to know the input size")
        input_shape = (data.in_channels, data.input_size, data.input_size)
    b1 = measure_latency(model, input_shape, 1, min_run_time=min_run_time) if latency else None
    b64 = measure_latency(model, input_shape, 64, min_run_time=min_run_time) if latency else None
    return ModelSummary(
        params=count_params(model),
        flops=count_flops(model, (1, *input_shape)),
        storage_bits=storage_bits(model),
        latency_ms_b1=b1.median_ms if b1 else float("nan"),
        latency_ms_b64=b64.median_ms if b64 else float("nan"),
        threads=torch.get_num_threads(),
        val_acc=evaluate(model, data.val)["acc"] if data is not None else None,
        test_acc=evaluate(model, data.test)["acc"] if data is not None else None,
    )
