"""Latency: the one timer every prunekit measurement uses (``torch.utils.benchmark.Timer.blocked_autorange``,
median of blocks after a warm-up), for one network or for several measured in alternation, so that load changes
on a shared machine hit every candidate alike.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils import benchmark


def time_ms(fn: Callable[[], Any], threads: int | None = None, min_run_time: float = 0.2) -> tuple[float, float, int]:
    """``(median ms, interquartile range ms, runs)`` of calling ``fn``, after one untimed warm-up call."""
    check_latency_settings(min_run_time, threads)
    fn()  # warm-up (allocations, lazy initialisation)
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads or torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=min_run_time)
    return m.median * 1e3, m.iqr * 1e3, len(m.times)


def paired_latency(runners: dict[str, Callable[[], Any]], threads: int | None = None, repeats: int = 5,
                   min_run_time: float = 0.2) -> dict[str, float]:
    """Median latency (ms) of each runner, measured in alternation ``repeats`` times."""
    check_latency_settings(min_run_time, threads, repeats=repeats)
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            times[name].append(time_ms(run, threads, min_run_time)[0])
    return {k: statistics.median(v) for k, v in times.items()}


def forward_runner(model: nn.Module, input_shape: tuple[int, ...], batch: int) -> Callable[[], Any]:
    """A no-grad forward of ``model`` (in eval mode) on a fixed random batch."""
    tensors = [*model.parameters(), *model.buffers()]  # sparse-kernel layers hold their weights as buffers
    x = torch.randn(batch, *input_shape, device=tensors[0].device if tensors else torch.device("cpu"))

    def run():
        with torch.no_grad():
            return model(x)

    return run


@dataclass(frozen=True)
class Latency:
    """Median forward latency in milliseconds and the settings it was measured under."""

    median_ms: float
    iqr_ms: float
    batch_size: int
    threads: int
    runs: int


def check_latency_settings(min_run_time: float, threads: int | None = None, batches: tuple[int, ...] = (1,),
                           repeats: int = 1) -> None:
    """Refuse latency settings that would never finish or mean nothing (NaN or infinite seconds, no batches).

    Raises:
        ValueError: naming the setting, what it got and what it accepts.
    """
    if isinstance(min_run_time, bool) or not isinstance(min_run_time, (int, float)) or \
            not math.isfinite(min_run_time) or not 0 < min_run_time <= 600:
        raise ValueError(f"min_run_time (--min-run-time) must be seconds in (0, 600], got {min_run_time!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads (--threads) must be an int >= 1, got {threads!r}")
    if not batches or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batches):
        raise ValueError(f"batch sizes (--batch) must be ints >= 1, got {list(batches)}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats (--repeats) must be an int >= 1, got {repeats!r}")


def measure_latency(model: nn.Module, input_shape: tuple[int, ...], batch_size: int = 1,
                    threads: int | None = None, min_run_time: float = 0.5) -> Latency:
    """Median eval-mode forward time of ``model`` (:func:`time_ms`).

    Args:
        input_shape: Shape of one example, without the batch dimension, e.g. ``(1, 28, 28)``.
        threads: Intra-op threads (default: ``torch.get_num_threads()``), recorded in the result.
        min_run_time: Seconds of measurement (more gives a steadier median).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    check_latency_settings(min_run_time, threads, (batch_size,))
    threads = threads or torch.get_num_threads()
    was_training = model.training
    model.eval()
    median, iqr, runs = time_ms(forward_runner(model, input_shape, batch_size), threads, min_run_time)
    model.train(was_training)
    return Latency(median_ms=median, iqr_ms=iqr, batch_size=batch_size, threads=threads, runs=runs)


