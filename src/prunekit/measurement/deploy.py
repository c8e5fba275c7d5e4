"""The inference form of a (pruned) network and honest latency: BatchNorm folding, memory format chosen by
measurement, ONNX Runtime, and the *limit* a pruned model is judged against.

The limit: a network of the same architecture made uniformly thinner (one width multiplier for every hidden
layer) until its FLOPs match the pruned model's, built directly. Pruning keeps an uneven width profile, so its
speedup at equal FLOPs can fall short of, or beat, the uniformly thinned network's; ``speedup / limit`` says which.
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from prunekit.measurement.latency import paired_latency, time_ms
from prunekit.measurement.metrics import count_flops

_FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@torch.no_grad()
def _fold_into_(layer: nn.Module, norm: nn.modules.batchnorm._BatchNorm) -> None:
    """layer <- norm(layer(.)) for a BatchNorm in eval mode: W' = W * s, b' = (b - mean) * s + beta, with
    s = gamma / sqrt(var + eps) per output channel."""
    if norm.running_mean is None or norm.running_var is None:
        raise ValueError("a BatchNorm without running statistics cannot be folded")
    scale = torch.rsqrt(norm.running_var + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight
    shift = -norm.running_mean * scale
    if norm.bias is not None:
        shift = shift + norm.bias
    w = layer.weight
    layer.weight.copy_(w * scale.reshape(-1, *([1] * (w.dim() - 1))).to(w))
    if layer.bias is None:
        layer.bias = nn.Parameter(shift.to(w))
    else:
        layer.bias.copy_(layer.bias * scale.to(w) + shift.to(w))


def fold_batchnorm(model: nn.Module) -> tuple[fx.GraphModule, int]:
    """A copy of ``model`` (eval mode) with every BatchNorm that directly follows a conv/linear layer (and is its
    only reader) folded into that layer's weights and bias; the original is not modified.

    Returns:
        (folded GraphModule, number of BatchNorms folded).

    Raises:
        ValueError: the model cannot be traced by ``torch.fx`` (data-dependent control flow).
    """
    model = copy.deepcopy(model).eval()
    try:
        graph_module = fx.symbolic_trace(model)
    except Exception as exc:  # noqa: BLE001 - fx raises many types
        raise ValueError(f"cannot trace {type(model).__name__} with torch.fx to fold BatchNorm "
                         f"({exc.__class__.__name__}: {exc}); export without folding (--no-fold)") from exc
    modules = dict(graph_module.named_modules())
    folded = 0
    for node in list(graph_module.graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(node.target), _NORMS):
            continue
        source = node.args[0] if node.args else None
        if not isinstance(source, fx.Node) or source.op != "call_module" or len(source.users) != 1:
            continue
        layer = modules.get(source.target)
        if not isinstance(layer, _FOLDABLE) or (isinstance(layer, nn.Linear) and not isinstance(
                modules[node.target], nn.BatchNorm1d)):
            continue
        _fold_into_(layer, modules[node.target])
        node.replace_all_uses_with(source)
        graph_module.graph.erase_node(node)
        folded += 1
    graph_module.graph.lint()
    graph_module.delete_all_unused_submodules()
    graph_module.recompile()
    return graph_module, folded


def eager_runner(model: nn.Module, input_shape: tuple[int, ...], batch: int, channels_last: bool = False
                 ) -> Callable[[], Any]:
    """A no-grad eval forward on a fixed random batch, optionally with channels-last model and input."""
    model = model.eval()
    x = torch.randn(batch, *input_shape)
    if channels_last and x.dim() == 4:
        model = copy.deepcopy(model).to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    def run():
        with torch.no_grad():
            return model(x)
    return run


def onnx_runner(path: str | Path, input_shape: tuple[int, ...], batch: int, threads: int) -> Callable[[], Any]:
    """An ONNX Runtime session (all graph optimisations, ``threads`` intra-op threads) on a fixed random batch."""
    from prunekit.persistence.export import onnx_session

    session = onnx_session(path, threads=threads)
    x = {"input": torch.randn(batch, *input_shape).numpy()}
    return lambda: session.run(None, x)


@dataclass
class InferenceForm:
    """A network ready to run: folded, memory format chosen, and the measurements that chose it."""

    model: nn.Module
    folded: int
    channels_last: bool
    latency_ms: dict[str, float] = field(default_factory=dict)


def inference_form(model: nn.Module, input_shape: tuple[int, ...], batch: int = 64, threads: int | None = None,
                   min_run_time: float = 0.2) -> InferenceForm:
    """Fold BatchNorm, then keep channels-last only where it measures faster on this machine (4-D inputs).

    The returned model is a copy in eval mode; ``latency_ms`` holds the contiguous and channels-last medians.
    """
    threads = threads or torch.get_num_threads()
    folded, count = fold_batchnorm(model)
    times = {"contiguous": time_ms(eager_runner(folded, input_shape, batch), threads, min_run_time)[0]}
    if len(input_shape) == 3:
        times["channels_last"] = time_ms(eager_runner(folded, input_shape, batch, True), threads, min_run_time)[0]
    use_cl = times.get("channels_last", float("inf")) < times["contiguous"]
    if use_cl:
        folded = folded.to(memory_format=torch.channels_last)
    return InferenceForm(folded, count, use_cl, times)


def uniform_width_model(build: Callable[[float], nn.Module], flops: float, input_shape: tuple[int, ...],
                        full_width: float = 1.0, steps: int = 30) -> tuple[nn.Module, float]:
    """The limit network: ``build(width)`` for the width whose FLOPs come closest to ``flops``.

    ``build`` maps a width multiplier to a fresh network (a zoo model's ``ModelConfig.width``); FLOPs grow with
    width, so bisection finds the boundary, and the nearer of its two sides is returned with its width.

    Raises:
        ValueError: ``flops`` is not positive or exceeds the full-width network's FLOPs.
    """
    shape = (1, *input_shape)
    full = count_flops(build(full_width), shape)
    if not 0 < flops <= full * 1.0001:
        raise ValueError(f"flops must be in (0, {full}] (the full-width network's), got {flops}")
    lo, hi = 0.0, full_width
    for _ in range(steps):
        mid = (lo + hi) / 2
        if count_flops(build(mid), shape) < flops:
            lo = mid
        else:
            hi = mid
    candidates = [w for w in (lo, hi) if w > 0]
    best = min(candidates, key=lambda w: abs(count_flops(build(w), shape) - flops))
    return build(best), best


@contextmanager
def _quiet_native_output() -> Iterator[None]:
    """Silence what native code writes to the process's stdout/stderr (the profiler's start/stop trace lines)."""
    sys.stdout.flush(), sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1), os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved[0], 1), os.dup2(saved[1], 2)
        for fd in (*saved, null):
            os.close(fd)


def op_profile(model: nn.Module, input_shape: tuple[int, ...], batch: int = 64, runs: int = 10, top: int = 8
               ) -> list[dict[str, Any]]:
    """Where eager time goes: the ``top`` operators by self CPU time over ``runs`` forwards (torch.profiler),
    each with its share of the total."""
    run = eager_runner(model, input_shape, batch)
    run()
    with _quiet_native_output(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(runs):
            run()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return [{"op": e.key, "ms_per_forward": e.self_cpu_time_total / 1e3 / runs, "calls_per_forward": e.count / runs,
             "share": e.self_cpu_time_total / total} for e in events[:top]]


def export_runners(models: dict[str, nn.Module], input_shape: tuple[int, ...], batches: Sequence[int], threads: int,
                   onnx: bool, workdir: str | Path | None = None, min_run_time: float = 0.2
                   ) -> tuple[dict[tuple[str, str, int], Callable[[], Any]], dict[str, InferenceForm]]:
    """Runners keyed (model, engine, batch) for the eager inference form and, with ``onnx``, ONNX Runtime on the
    exported folded model (files under ``workdir`` or a temporary folder); and each model's inference form."""
    from prunekit.persistence.export import export_onnx

    runners: dict[tuple[str, str, int], Callable[[], Any]] = {}
    forms: dict[str, InferenceForm] = {}
    folder = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="prunekit-bench-"))
    for name, model in models.items():
        forms[name] = form = inference_form(model, input_shape, max(batches), threads, min_run_time)
        for b in batches:
            runners[(name, "eager", b)] = eager_runner(form.model, input_shape, b)
        if onnx:  # the folded graph before any memory-format change: ONNX Runtime picks its own layout
            path = export_onnx(fold_batchnorm(model)[0], folder / f"{name}.onnx", input_shape)
            for b in batches:
                runners[(name, "onnxruntime", b)] = onnx_runner(path, input_shape, b, threads)
    return runners, forms


def measure_against_limit(pruned: nn.Module, dense: nn.Module, input_shape: tuple[int, ...],
                          build: Callable[[float], nn.Module] | None = None, *, threads: int | None = None,
                          batches: Sequence[int] = (1, 64), repeats: int = 5, min_run_time: float = 0.2,
                          onnx: bool = True, full_width: float = 1.0) -> dict[str, Any]:
    """Latency of ``pruned`` against ``dense`` and against the uniformly thinned limit, per engine and batch.

    Every network is measured in its inference form (BatchNorm folded; eager with the faster memory format, and
    ONNX Runtime with all graph optimisations), all in alternation in this process.

    Args:
        build: width multiplier -> fresh network of the dense architecture (no limit without it).

    Returns:
        ``{"rows": [{"engine", "batch", "dense_ms", "pruned_ms", "limit_ms", "speedup", "limit_speedup",
        "fraction_of_limit"}], "limit_width", "flops": {...}, "threads", "profile": [...]}``.
    """
    threads = threads or torch.get_num_threads()
    shape = (1, *input_shape)
    models = {"dense": dense.eval(), "pruned": pruned.eval()}
    limit_width = None
    if build is not None:
        limit, limit_width = uniform_width_model(build, count_flops(pruned, shape), input_shape, full_width)
        models["limit"] = limit.eval()
    flops = {k: count_flops(m, shape) for k, m in models.items()}
    runners, forms = export_runners(models, input_shape, batches, threads, onnx, min_run_time=min_run_time)
    times = paired_latency(runners, threads, repeats, min_run_time)
    rows = []
    for engine in ("eager", "onnxruntime") if onnx else ("eager",):
        for b in batches:
            d, p = times[("dense", engine, b)], times[("pruned", engine, b)]
            lim = times.get(("limit", engine, b))
            rows.append({"engine": engine, "batch": b, "dense_ms": d, "pruned_ms": p, "limit_ms": lim,
                         "speedup": d / p, "limit_speedup": None if lim is None else d / lim,
                         "fraction_of_limit": None if lim is None else (d / p) / (d / lim)})
    return {"rows": rows, "limit_width": limit_width, "flops": flops, "threads": threads,
            "profile": op_profile(forms["pruned"].model, input_shape, max(batches))}


def latency_markdown(result: dict[str, Any]) -> str:
    """The table of :func:`measure_against_limit` and the pruned model's operator profile."""
    f = result["flops"]
    lines = [f"FLOPs: dense {f['dense'] / 1e6:.2f} M, pruned {f['pruned'] / 1e6:.2f} M"
             + (f", uniformly thinned limit {f['limit'] / 1e6:.2f} M (width x{result['limit_width']:.3f})"
                if "limit" in f else "") + f"; {result['threads']} thread(s), medians of alternated runs.", "",
             "| engine | batch | dense ms | pruned ms | limit ms | speedup | limit speedup | fraction of limit |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lim = "-" if r["limit_ms"] is None else f"{r['limit_ms']:.3f}"
        ls = "-" if r["limit_speedup"] is None else f"{r['limit_speedup']:.2f}x"
        fr = "-" if r["fraction_of_limit"] is None else f"{r['fraction_of_limit']:.2f}"
        lines.append(f"| {r['engine']} | {r['batch']} | {r['dense_ms']:.3f} | {r['pruned_ms']:.3f} | {lim} | "
                     f"{r['speedup']:.2f}x | {ls} | {fr} |")
    lines += ["", "Where the pruned model's eager time goes (inference form, largest batch):", "",
              "| op | ms per forward | calls per forward | share |", "|---|---|---|---|"]
    lines += [f"| {p['op']} | {p['ms_per_forward']:.3f} | {p['calls_per_forward']:g} | {100 * p['share']:.1f}% |"
              for p in result["profile"]]
    return "\n".join(lines)
