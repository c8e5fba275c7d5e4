"""Structured (channel) pruning, prunekit vs Torch-Pruning, on the dense Fashion-MNIST baselines.

For every model, FLOPs-reduction target (x2, x4, x8) and criterion, both tools prune the same dense checkpoint and
then get exactly the same treatment, so only the pruning differs:

* BatchNorm statistics re-estimated on 512 training images (``prunekit.recovery.batchnorm.recalibrate_batchnorm_``),
  then validation/test accuracy "right after pruning";
* fine-tuning with ``prunekit.fit`` and prunekit's fine-tuning default (SGD lr 0.01 with a linear warm-up over
  the first 15% of the steps, then cosine; chosen on validation by ``benchmarks/finetune.py``), batch 128,
  crop+flip, seed 0, ``--finetune-epochs`` epochs; the reported test accuracy is that of the best-on-validation
  epoch;
* ``--extra-seeds 1 2``: at ``--seed-factors`` (default the largest target), each tool's best criterion on seed 0's
  validation accuracy is run again with those seeds (scoring batches, shuffles and augmentation change), and the
  markdown reports mean and standard deviation: the rows that decide the README's comparison;
* parameters and FLOPs by ``prunekit.measurement.metrics`` (FLOPs = 2 x MACs of convolutions and matrix products);
* CPU latency at batch 64 by ``prunekit.measurement.latency.paired_latency``, dense and pruned measured back to
  back in this process (alternated ``--latency-repeats`` times, medians kept); speedup = dense ms / pruned ms and
  ratio = speedup / FLOPs reduction (1.0 means the FLOPs saving turns fully into wall-clock time).

prunekit (``prunekit.prune_`` with the criterion's registered config, e.g. ``prunekit.L1Config``): one-shot, global
allocation of per-group mean-normalised scores, at most 90% of a group removed; the plan meets the FLOPs target
exactly (exact cost model, within 2%).

Torch-Pruning (the installed version, its own pruner ``tp.pruner.BasePruner`` -- ``MetaPruner`` is a deprecated alias
in 1.6 -- with ``global_pruning=True`` and its own importances ``MagnitudeImportance(p=1)``, ``(p=2)``,
``BNScaleImportance()``, ``TaylorImportance()``, ``RandomImportance()``, default normalisation): version 1.6 has no
FLOPs target of its own, so we follow the recipe of Torch-Pruning's own benchmark scripts: ``pruning_ratio=1.0``
spread over ``iterative_steps=400`` small steps, ``pruner.step()`` until ``tp.utils.count_ops_and_params`` reports
the target MAC reduction (its own counter; our counter is used for the reported FLOPs). ``max_pruning_ratio=0.9``
mirrors prunekit's per-group cap. The Taylor importance reads ``.grad``: gradients are accumulated over the same
8 training batches of 64 that prunekit's Taylor criterion scores with (``loss.backward()`` before the first step;
Torch-Pruning slices the gradients along with the weights at every step). One trajectory serves x2, x4 and x8.

A second table, the coverage table, checks on every zoo model and every small test architecture of
``tests/architectures.py`` whether each tool can remove about half of every prunable group's channels, whether the
result runs, and whether its outputs equal those of the original model with the same channels zeroed (forward hooks
zero each removed channel at the output of the layers that produce it and at the input of the layers that read it).

Every finished row is cached as ``<out>/cache/<row>.json`` (with the settings that made it); a re-run skips them.

    python benchmarks/structured.py --extra-seeds 1 2    # the full benchmark (both models, x2 x4 x8, all criteria)
    python benchmarks/structured.py --factors 8 --extra-seeds 1 2 --finetune-epochs 2 \
        --out benchmarks/results/structured-2ep          # x8 with two fine-tuning epochs
    python benchmarks/structured.py --quick --out /tmp/q # seconds on 2 cores: digits, a small ResNet-20, x2
    python benchmarks/structured.py --remeasure-latency  # latency of every cached row again, on an idle machine

Latency uses torch's default thread count (``--threads`` to change it; ``--quick`` uses 1): several threads on a
machine that other jobs keep busy make small convolutions many times slower, so run the full benchmark on an idle
machine or with ``--threads 1``.
"""

from __future__ import annotations

import argparse
import copy
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from tqdm.auto import tqdm

import prunekit
from common import (
    CHECKPOINT_DIR,
    CONV_MODELS,
    ROOT,
    STRUCTURAL,
    TP_IMPORTANCES,
    RowCache,
    Settings,
    dense_pruned_latency,
    dense_summary,
    finish_row,
    fmt_acc,
    git_commit,
    model_settings,
    plot_accuracy_vs_flops,
    prune_copy,
    prune_torch_pruning,
    row_key,
    run_setup,
    seeded,
    structural_config,
    warmup_text,
    write_json,
    write_text,
)
from prunekit.channels.graph import ChannelGraph, ChannelPlan, SliceKind, find_output_layers
from prunekit.data import DataSplits
from prunekit.methods.rounds import layer_widths
from prunekit.recovery.batchnorm import recalibrate_batchnorm_

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "structured"
OUR_METHODS = STRUCTURAL
TOOLS = ("prunekit", "torch-pruning")
# Every row of structured.json has these fields (tests check them).
ROW_FIELDS = (
    "model", "tool", "method", "factor", "params", "flops", "dense_params", "dense_flops", "flops_reduction",
    "params_reduction", "latency_dense_ms", "latency_pruned_ms", "latency_speedup", "speedup_per_flops_reduction",
    "latency_batch", "latency_threads", "val_acc_pruned", "test_acc_pruned", "val_acc", "test_acc", "best_epoch",
    "dense_test_acc", "seconds_prune", "seconds_finetune", "tool_info", "history",
)
COVERAGE_FIELDS = ("status", "ran", "forward", "shape_ok", "max_abs_diff", "channels_kept", "skipped_groups",
                   "detail", "warnings")
COVERAGE_STATUSES = ("ok", "fails", "nothing pruned")
QUICK = {"models": ["resnet20"], "factors": [2.0], "methods": ["l1", "taylor"], "tp_methods": ["l1"]}


def prune_prunekit(dense: nn.Module, data: DataSplits, method: str, factor: float, s: Settings
                   ) -> tuple[nn.Module, dict[str, Any]]:
    """prunekit one-shot to keep 1/factor of the FLOPs (``prunekit.prune_`` with the criterion's registered
    config); BatchNorm re-estimated inside."""
    net, record = prune_copy(dense, structural_config(method, 1.0 / factor, s), data, s.seed)
    r = record.rounds[-1]
    return net, {"predicted_keep": r["predicted_keep"], "removed_channels": r["removed_channels"]}


# -------------------------------------------------------------------------------------------------- coverage


def _channel_dim(module: nn.Module) -> int:
    """Dimension of a module's inputs/outputs that holds its channels."""
    if isinstance(module, (nn.Linear, nn.LayerNorm, nn.MultiheadAttention, nn.Embedding)):
        return -1
    return 1


def _zero(t: Any, dim: int, idxs: torch.Tensor) -> Any:
    if not isinstance(t, torch.Tensor) or t.dim() == 0:
        return t
    return t.clone().index_fill_(dim % t.dim(), idxs.to(t.device), 0.0)


@torch.no_grad()
def zeroed_forward(model: nn.Module, removals: list[tuple[str, str, list[int]]], x: torch.Tensor) -> torch.Tensor:
    """Outputs of ``model`` with the removed channels zeroed: at the output of every layer that produces them
    (``"out"``), at the input of every layer that reads them (``"in"``), and for the q/k/v projections inside an
    ``nn.MultiheadAttention``, which no hook reaches, as rows of its ``in_proj`` weight and bias (``"in_proj"``, on
    a copy); ``model`` itself is not changed."""
    if any(kind == "in_proj" for _, kind, _ in removals):
        model = copy.deepcopy(model)
        modules = dict(model.named_modules())
        for name, kind, idxs in removals:
            if kind == "in_proj":
                rows = torch.as_tensor(idxs, dtype=torch.long)
                for p in (modules[name].in_proj_weight, modules[name].in_proj_bias):
                    if p is not None:
                        p.index_fill_(0, rows, 0.0)
    modules = dict(model.named_modules())
    handles = []
    for name, kind, idxs in removals:
        if kind == "in_proj":
            continue
        module = modules[name]
        dim, ix = _channel_dim(module), torch.as_tensor(idxs, dtype=torch.long)
        if kind == "out":
            def hook(mod, args, out, dim=dim, ix=ix):
                if isinstance(out, tuple):
                    return (_zero(out[0], dim, ix), *out[1:])
                return _zero(out, dim, ix)

            handles.append(module.register_forward_hook(hook))
        else:
            def pre_hook(mod, args, dim=dim, ix=ix):
                return tuple(_zero(a, dim, ix) for a in args)

            handles.append(module.register_forward_pre_hook(pre_hook))
    try:
        return model.eval()(x)
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def calibrate_bn_(model: nn.Module, shape: tuple[int, ...], seed: int = 0) -> None:
    """BatchNorm running statistics averaged over a few random batches (outputs O(1) in eval mode), then eval()."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(2 if norms else 0):
        model(torch.randn(8, *shape, generator=gen))
    model.eval()


def _total_width(model: nn.Module) -> int:
    """Output channels of every conv/linear layer, an nn.MultiheadAttention's fused q/k/v rows included (once its
    heads are pruned they become q/k/v linear layers)."""
    fused = sum(m.in_proj_weight.shape[0] for m in model.modules()
                if isinstance(m, nn.MultiheadAttention) and m.in_proj_weight is not None)
    return sum(layer_widths(model).values()) + fused


def _short(exc: BaseException, limit: int = 110) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


_NOT_ZERO_EQUIVALENT = (nn.LayerNorm, nn.GroupNorm, nn.MultiheadAttention)


def _verdict(pruned: nn.Module, reference: torch.Tensor, x: torch.Tensor, cell: dict[str, Any],
             hint: str = "") -> dict[str, Any]:
    """Fill forward / shape / equivalence fields of a coverage cell from the pruned model and the zeroed original."""
    try:
        with torch.no_grad():
            got = pruned.eval()(x)
    except Exception as exc:  # noqa: BLE001 - a broken forward pass is the finding
        return {**cell, "status": "fails", "forward": False, "detail": f"forward pass: {_short(exc)}"}
    cell.update(forward=True, shape_ok=tuple(got.shape) == tuple(reference.shape))
    if not cell["shape_ok"]:
        return {**cell, "status": "fails", "detail": f"output shape {tuple(got.shape)} != {tuple(reference.shape)}"}
    diff = (got - reference).abs().max().item()
    cell["max_abs_diff"] = diff
    if not diff <= 1e-4 * max(1.0, reference.abs().max().item()):
        return {**cell, "status": "fails", "detail": f"outputs differ from the zeroed original by {diff:.2g}{hint}"}
    return {**cell, "status": "ok"}


def _coverage_setup(factory: Callable[[], nn.Module], shape: tuple[int, ...], seed: int):
    """A calibrated model, an untouched copy of it, an input batch, an empty cell and the model's total width."""
    torch.manual_seed(seed)
    model = factory()
    calibrate_bn_(model, shape, seed)
    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(seed + 1))
    return model, copy.deepcopy(model), x, {k: None for k in COVERAGE_FIELDS}, _total_width(model)


def coverage_prunekit(factory: Callable[[], nn.Module], shape: tuple[int, ...], seed: int = 0) -> dict[str, Any]:
    """prunekit: ChannelGraph (its probe moves unsafe groups to ``skipped``), a random half of every group, shrink_
    (which verifies itself against masks), then the shared zeroed-original check."""
    model, original, x, cell, dense_width = _coverage_setup(factory, shape, seed)
    try:
        graph = ChannelGraph(model, x)
        gen = torch.Generator().manual_seed(seed)
        plan = ChannelPlan({g.root: tuple(c for u in torch.randperm(len(g.units), generator=gen)[
            : len(g.units) // 2].tolist() for c in g.units[u]) for g in graph.groups if len(g.units) >= 2})
        cell["skipped_groups"] = len(graph.skipped)
        if not plan:
            return {**cell, "status": "nothing pruned", "ran": True,
                    "detail": "no prunable group" + (f"; skipped: {next(iter(graph.skipped.values()))[:90]}"
                                                     if graph.skipped else "")}
        modules = set(dict(model.named_modules()))
        removals = []
        for root, idxs in plan.removed.items():
            removed = torch.zeros(graph.by_root[root].size, dtype=torch.bool)
            removed[list(idxs)] = True
            for m in graph.by_root[root].members:
                hit = [i for i, r in zip(m.idxs, m.root_idxs) if removed[r]]
                if m.name in modules and hit:
                    inside = isinstance(m.module, nn.MultiheadAttention) and m.kind is SliceKind.OUT
                    removals.append((m.name, "in_proj" if inside else "out" if m.kind is SliceKind.OUT else "in", hit))
        graph.shrink_(plan)
    except Exception as exc:  # noqa: BLE001 - any failure is the finding
        return {**cell, "status": "fails", "ran": False, "detail": _short(exc)}
    cell.update(ran=True, channels_kept=_total_width(model) / dense_width)
    cell = _verdict(model, zeroed_forward(original, removals, x), x, cell)
    if cell["status"] == "ok" and cell["skipped_groups"]:
        cell["detail"] = "skipped: " + "; ".join(f"{k}: {v.split(';')[0]}" for k, v in graph.skipped.items())[:200]
    return cell


def coverage_torch_pruning(factory: Callable[[], nn.Module], shape: tuple[int, ...], seed: int = 0) -> dict[str, Any]:
    """Torch-Pruning: its own pruner (local 50%, random importance, output layer ignored), stepping interactively
    to record every (layer, in/out, indices) it removes, then the shared zeroed-original check."""
    model, original, x, cell, dense_width = _coverage_setup(factory, shape, seed)
    names = {m: n for n, m in model.named_modules()}
    removals = []
    try:
        modules = dict(model.named_modules())
        ignored = [modules[n] for n in find_output_layers(model, x)]
        torch.manual_seed(seed)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pruner = tp.pruner.BasePruner(model, x, importance=tp.importance.RandomImportance(), pruning_ratio=0.5,
                                          global_pruning=False, ignored_layers=ignored)
        for group in pruner.step(interactive=True):
            for dep, idxs in group:
                name = names.get(dep.target.module)
                if name is not None and len(idxs):
                    kind = "out" if pruner.DG.is_out_channel_pruning_fn(dep.handler) else "in"
                    removals.append((name, kind, [int(i) for i in idxs]))
            group.prune()
    except Exception as exc:  # noqa: BLE001 - any failure is the finding
        return {**cell, "status": "fails", "ran": False, "detail": _short(exc)}
    cell.update(ran=True, channels_kept=_total_width(model) / dense_width)
    if not removals:
        return {**cell, "status": "nothing pruned", "detail": "the pruner removed no channel"}
    originals = dict(original.named_modules())
    touched = sorted({type(originals[n]).__name__ for n, _, _ in removals
                      if isinstance(originals[n], _NOT_ZERO_EQUIVALENT)})
    hint = f" (it prunes {', '.join(touched)} channels)" if touched else ""
    cell = _verdict(model, zeroed_forward(original, removals, x), x, cell, hint)
    cell["warnings"] = sorted({" ".join(str(w.message).split())[:160] for w in caught})
    return cell


def coverage_architectures(log: Callable[[str], None], zoo: Iterable[str] | None = None
                           ) -> tuple[dict[str, tuple[str, Callable[[], nn.Module], tuple[int, ...]]], list[str]]:
    """Zoo models (``zoo``, default all; small: width 0.25, 3x8x8 inputs) and the test architectures of
    tests/architectures.py (skipped with a note when it cannot be imported)."""
    archs: dict[str, tuple[str, Callable[[], nn.Module], tuple[int, ...]]] = {}
    for name in prunekit.list_models() if zoo is None else zoo:
        config = prunekit.ModelConfig(name=name, num_classes=10, in_channels=3, input_size=8, width=0.25)
        archs[name] = ("zoo", lambda c=config: prunekit.create_model(c), (3, 8, 8))
    notes = []
    tests_dir = ROOT / "tests"
    if str(tests_dir) not in sys.path:
        sys.path.insert(0, str(tests_dir))
    try:
        import architectures
    except ImportError as exc:
        notes.append(f"test architectures skipped: tests/architectures.py could not be imported ({exc})")
        log(notes[-1])
        return archs, notes
    for name, arch in architectures.ARCHITECTURES.items():
        archs[name] = ("tests", arch.factory, tuple(arch.input_shape))
    return archs, notes


def run_coverage(progress: bool, log: Callable[[str], None], zoo: Iterable[str] | None = None) -> dict[str, Any]:
    """Every architecture x tool, on one thread (tiny convolutions; several threads on a busy machine are far
    slower). Not cached: it takes seconds and must follow code changes."""
    archs, notes = coverage_architectures(log, zoo)
    cells: dict[str, dict[str, Any]] = {}
    checks = {"prunekit": coverage_prunekit, "torch-pruning": coverage_torch_pruning}
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name in tqdm(archs, desc="coverage", disable=not progress, dynamic_ncols=True, leave=False):
            source, factory, shape = archs[name]
            cells[name] = {"source": source, "input_shape": list(shape)}
            for tool, check in checks.items():
                cells[name][tool] = check(factory, shape)
    finally:
        torch.set_num_threads(threads)
    return {"torch_pruning": tp.__version__, "torch": torch.__version__, "seconds": time.perf_counter() - t0,
            "notes": notes, "architectures": cells}


def coverage_label(cell: dict[str, Any]) -> str:
    kept = f"keeps {cell['channels_kept']:.0%} of channels" if cell.get("channels_kept") is not None else ""
    if cell["status"] == "ok":
        n = cell.get("skipped_groups") or 0
        return f"ok ({kept}" + (f", {n} group(s) skipped)" if n else ")")
    if cell["status"] == "nothing pruned":
        return f"nothing pruned ({cell['detail']})"
    return f"fails: {cell['detail']}"


# ---------------------------------------------------------------------------------------------------- output


def results_table(rows: list[dict[str, Any]], dense: dict[str, dict[str, Any]]) -> str:
    header = ["model", "tool", "criterion", "target", "params", "MFLOPs", "FLOPs red.",
              "latency b64 ms (dense / pruned)", "speedup", "speedup / FLOPs red.", "test acc after pruning %",
              "test acc fine-tuned %"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model, d in dense.items():
        lines.append(f"| {model} | dense | - | - | {d['params']:,} | {d['flops'] / 1e6:.2f} | 1.00x | "
                     f"{d['latency_ms']:.2f} | 1.00x | - | - | {fmt_acc(d['test_acc'])} |")
        for r in rows:
            if r["model"] != model:
                continue
            ok = "" if r["speedup_per_flops_reduction"] >= 0.8 else " (< 0.8)"
            seed = f" (seed {r['seed']})" if r.get("seed", 0) else ""
            lines.append(
                f"| {model} | {r['tool']} | {r['method']}{seed} | x{r['factor']:g} | {r['params']:,} | "
                f"{r['flops'] / 1e6:.2f} | {r['flops_reduction']:.2f}x | "
                f"{r['latency_dense_ms']:.2f} / {r['latency_pruned_ms']:.2f} | "
                f"{r['latency_speedup']:.2f}x | {r['speedup_per_flops_reduction']:.2f}{ok} | "
                f"{fmt_acc(r['test_acc_pruned'])} | {fmt_acc(r['test_acc'])} |")
    return "\n".join(lines)


def comparison_table(rows: list[dict[str, Any]]) -> str:
    """The two tools side by side per (model, target, criterion): fine-tuned test accuracy and speedup / FLOPs
    reduction (the table the README shows)."""
    by = {(r["model"], r["factor"], r["method"], r["tool"]): r for r in rows if not r.get("seed", 0)}
    header = ["model", "FLOPs target", "criterion", "test acc % prunekit", "test acc % Torch-Pruning",
              "speedup / FLOPs red. prunekit", "speedup / FLOPs red. Torch-Pruning"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model, factor, method in dict.fromkeys((r["model"], r["factor"], r["method"]) for r in rows):
        ours, theirs = by.get((model, factor, method, "prunekit")), by.get((model, factor, method, "torch-pruning"))

        def cell(r, key, fmt):
            return "-" if r is None else fmt(r[key])

        lines.append(f"| {model} | x{factor:g} | {method} | {cell(ours, 'test_acc', fmt_acc)} | "
                     f"{cell(theirs, 'test_acc', fmt_acc)} | "
                     f"{cell(ours, 'speedup_per_flops_reduction', lambda v: f'{v:.2f}')} | "
                     f"{cell(theirs, 'speedup_per_flops_reduction', lambda v: f'{v:.2f}')} |")
    return "\n".join(lines)


def seed_groups(rows: list[dict[str, Any]]) -> dict[tuple[str, float, str], tuple[str, list[float]]]:
    """(model, factor, tool) -> (criterion, test accuracies over its seeds) for every criterion run with more than
    one seed (each tool's best on seed-0 validation, see :func:`best_criterion`)."""
    accs: dict[tuple[str, float, str, str], list[float]] = {}
    for r in rows:
        accs.setdefault((r["model"], r["factor"], r["tool"], r["method"]), []).append(r["test_acc"])
    return {(m, f, t): (c, a) for (m, f, t, c), a in accs.items() if len(a) > 1}


def mean_spread(values: list[float]) -> str:
    """Mean and sample standard deviation, in percent, with the number of seeds."""
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f} (n={len(values)})"


def seeds_table(runs: dict[int, list[dict[str, Any]]], goal: float = 0.5) -> str:
    """The rows that decide the README's claim, per fine-tuning budget (``runs``: epochs -> rows): each tool's best
    criterion on validation, over several seeds, and the difference of the means against ``goal`` (points)."""
    header = ["model", "FLOPs target", "fine-tune epochs", "prunekit best criterion", "test acc %",
              "Torch-Pruning best criterion", "test acc %", "prunekit - Torch-Pruning", f"goal >= +{goal:g}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for epochs, rows in sorted(runs.items()):
        groups = seed_groups(rows)
        for model, factor in dict.fromkeys((m, f) for m, f, _ in groups):
            ours, theirs = groups.get((model, factor, "prunekit")), groups.get((model, factor, "torch-pruning"))
            if ours is None or theirs is None:
                continue
            diff = 100 * (statistics.mean(ours[1]) - statistics.mean(theirs[1]))
            lines.append(f"| {model} | x{factor:g} | {epochs} | {ours[0]} | {mean_spread(ours[1])} | {theirs[0]} | "
                         f"{mean_spread(theirs[1])} | {diff:+.2f} | {'met' if diff >= goal else 'missed'} |")
    return "\n".join(lines)


def coverage_table(coverage: dict[str, Any]) -> str:
    lines = ["| architecture | source | prunekit | Torch-Pruning |", "|---|---|---|---|"]
    for name, cell in coverage["architectures"].items():
        lines.append(f"| {name} | {cell['source']} | {coverage_label(cell['prunekit']).replace('|', '/')} | "
                     f"{coverage_label(cell['torch-pruning']).replace('|', '/')} |")
    return "\n".join(lines)


def write_outputs(out: Path, command: str, rows: list[dict[str, Any]], dense: dict[str, dict[str, Any]],
                  coverage: dict[str, Any], quick: bool) -> None:
    """structured.json, structured.md, structured_accuracy_vs_flops.png and coverage.json under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    payload = {"command": command, "quick": quick, "git_commit": git_commit(), "torch": torch.__version__,
               "torch_pruning": tp.__version__, "threads": torch.get_num_threads(), "row_fields": list(ROW_FIELDS),
               "dense": dense, "rows": rows}
    write_json(out / "structured.json", payload)
    write_json(out / "coverage.json", coverage)
    plot_accuracy_vs_flops(rows, dense, out / "structured_accuracy_vs_flops.png")
    s = next(iter(dense.values()))["settings"]
    ft, data = s["finetune"], s["data"]
    below = [r for r in rows if r["speedup_per_flops_reduction"] < 0.8]
    missed = [row_key(r["model"], r["tool"], r["method"], r["factor"]) for r in rows
              if not r["tool_info"].get("target_reached", True)]
    text = [
        "# Structured pruning: prunekit vs Torch-Pruning" + (" (quick smoke run)" if quick else ""),
        "",
        "Made by (from the repository root):",
        "",
        f"    {command}",
        "",
        *([f"and the latency of {sum(bool(r.get('latency_remeasured')) for r in rows)} of the {len(rows)} rows "
           "measured again on an idle machine by the same command with `--remeasure-latency` (re-pruned, architecture "
           "checked against the row).", ""] if any(r.get("latency_remeasured") for r in rows) else []),
        f"torch {torch.__version__}, torch-pruning {tp.__version__}, {s['threads']} CPU thread(s). Data: "
        f"{data['name']}" + (f" (first {data['limit']} training images)" if data["limit"] else "") + ". Both tools get "
        f"the same treatment after pruning: BatchNorm re-estimated on {s['bn_recalibration_images']} training "
        f"images, then {ft['epochs']} fine-tuning epoch(s) with `prunekit.fit` (SGD lr {ft['lr']}, "
        f"{warmup_text(ft)}{ft['schedule']}, batch {ft['batch_size']}, {ft['augment']}, seed {ft['seed']}); *test acc "
        "fine-tuned* is "
        "the test accuracy of the best-on-validation epoch, *after pruning* is measured after BatchNorm "
        f"re-estimation, before any training. prunekit: one-shot `prunekit.prune_`, global allocation, at most "
        f"{s['max_per_layer']:.0%} of a group. Torch-Pruning: `tp.pruner.BasePruner`, `global_pruning=True`, "
        f"`pruning_ratio=1.0` over {s['tp_iterative_steps']} steps (importance re-estimated on the shrinking "
        f"network at each step), stepped until its own MAC counter (`tp.utils.count_ops_and_params`) shows the "
        f"target, `max_pruning_ratio={s['max_per_layer']}`; Taylor gradients from the same {s['score_batches']} "
        f"batches of 64 prunekit's Taylor scores with. FLOPs "
        f"counted by `prunekit.count_flops` for both. Latency: batch {s['latency_batch']}, "
        "dense and pruned "
        f"measured alternately {s['latency_repeats']} time(s) in the same process (medians); the target for speedup "
        "/ FLOPs reduction is >= 0.8.",
        "",
        "## Side by side", "",
        comparison_table(rows),
        "",
        *(["## Several seeds", "",
           "Each tool's best criterion at the target, chosen on seed 0's validation accuracy, fine-tuned again with "
           "other seeds (scoring batches, shuffles and augmentation change); mean ± sample standard deviation of the "
           "test accuracy.", "", seeds_table({ft["epochs"]: rows}), ""] if seed_groups(rows) else []),
        "## All rows",
        "",
        results_table(rows, dense),
        "",
        f"Rows below the 0.8 speedup / FLOPs-reduction target: {len(below)} of {len(rows)}."
        + (f" Torch-Pruning stopped short of the target in: {', '.join(missed)}." if missed else ""),
        "",
        "![accuracy vs FLOPs](structured_accuracy_vs_flops.png)",
        "",
        "## Coverage: which architectures each tool prunes correctly",
        "",
        "Each tool removes about half of every prunable group's channels (prunekit: a random half of each group of its "
        "`ChannelGraph`; Torch-Pruning: its pruner with `RandomImportance`, `pruning_ratio=0.5`, local), the output "
        "layer excluded. *ok* means pruning ran, the pruned model runs, keeps the output shape and its outputs equal "
        "(to 1e-4 relative) those of the original with the removed channels zeroed at every layer producing or "
        "reading them. prunekit's *skipped* groups are those its probe found it cannot remove exactly; they stay "
        "dense. Zoo models are built with width 0.25 for 3x8x8 inputs; details in coverage.json.",
        "",
        coverage_table(coverage),
        "",
        *[f"Note: {n}" for n in coverage["notes"]],
    ]
    write_text(out / "structured.md", "\n".join(text).rstrip() + "\n")


# ------------------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="structured.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=None, help=f"default: {' '.join(CONV_MODELS)}")
    p.add_argument("--factors", nargs="+", type=float, default=None, help="FLOPs reduction targets (default 2 4 8)")
    p.add_argument("--methods", nargs="*", default=None, help=f"prunekit criteria (default: {' '.join(OUR_METHODS)})")
    p.add_argument("--tp-methods", nargs="*", default=None,
                   help=f"Torch-Pruning importances (default: {' '.join(TP_IMPORTANCES)})")
    p.add_argument("--finetune-epochs", type=int, default=1)
    p.add_argument("--extra-seeds", nargs="*", type=int, default=[],
                   help="seeds to run again, after seed 0, for each tool's best criterion (on validation) at "
                        "--seed-factors: the rows that decide the comparison, reported as mean and spread")
    p.add_argument("--seed-factors", nargs="*", type=float, default=None,
                   help="the targets --extra-seeds repeat (default: the largest of --factors)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N training images (smoke runs)")
    p.add_argument("--latency-repeats", type=int, default=3, help="dense/pruned latency alternations (medians kept)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's default, all cores; --quick: 1)")
    p.add_argument("--checkpoint-dir", type=Path, default=CHECKPOINT_DIR)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--quick", action="store_true", help="about a minute on 2 cores: digits, small resnet20, x2")
    p.add_argument("--no-coverage", action="store_true", help="skip the coverage table (coverage.json is empty)")
    p.add_argument("--remeasure-latency", action="store_true",
                   help="after the rows are done, measure every row's latency again (on an idle machine)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    for name, default in (("models", list(CONV_MODELS)), ("factors", [2.0, 4.0, 8.0]),
                          ("methods", list(OUR_METHODS)), ("tp_methods", list(TP_IMPORTANCES))):
        if getattr(args, name) is None:
            setattr(args, name, QUICK[name] if args.quick else default)
    bad = [m for m in args.methods if m not in OUR_METHODS]
    bad_tp = [m for m in args.tp_methods if m not in TP_IMPORTANCES]
    if bad or bad_tp:
        p.error(f"unknown criteria {bad + bad_tp}; --methods accepts {list(OUR_METHODS)}, --tp-methods accepts "
                f"{list(TP_IMPORTANCES)}")
    if any(not f > 1 for f in args.factors):
        p.error(f"--factors must be > 1 (a FLOPs reduction, e.g. 2 keeps half), got {args.factors}")
    if args.seed_factors is None:
        args.seed_factors = [max(args.factors)] if args.extra_seeds else []
    if not set(args.seed_factors) <= set(args.factors):
        p.error(f"--seed-factors {args.seed_factors} must be among --factors {args.factors}")
    if any(seed <= 0 for seed in args.extra_seeds) or len(set(args.extra_seeds)) < len(args.extra_seeds):
        p.error(f"--extra-seeds must be distinct seeds > 0 (seed 0 is every row's first run), got {args.extra_seeds}")
    if args.finetune_epochs < 0:
        p.error(f"--finetune-epochs must be >= 0, got {args.finetune_epochs}")
    if args.quick and args.threads is None:
        args.threads = 1  # small convolutions on a busy 2-core machine are far faster on one thread
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    if args.latency_repeats < 1:
        p.error(f"--latency-repeats must be >= 1, got {args.latency_repeats}")
    if args.quick and args.models != ["resnet20"]:
        p.error("--quick runs the small digits resnet20 only; drop --models or --quick")
    return args


def run_model(model_name: str, checkpoint: Path, jobs: list[tuple[str, str]], factors: list[float],
              base: Settings, cache: RowCache, bar: tqdm, progress: bool, log: Callable[[str], None],
              extra_seeds: Iterable[int] = (), seed_factors: Iterable[float] = ()
              ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The dense row and every (tool, criterion, factor) row of one model, from the cache where possible.

    Then, at each of ``seed_factors``, each tool's best criterion (on seed 0's validation accuracy) again with
    every seed of ``extra_seeds``: the rows that decide the README's comparison, with their spread."""
    dense, _, settings = model_settings(checkpoint, base)
    sdict = settings.to_dict()
    dense_row = cache.get(f"{model_name}__dense", sdict)
    found = {(tool, method, f): cache.get(row_key(model_name, tool, method, f), sdict)
             for tool, method in jobs for f in factors}
    rows = [r for r in found.values() if r is not None]
    bar.update(len(rows))
    data: DataSplits | None = None

    def run(tool: str, method: str, todo: list[float], s: Settings) -> None:
        nonlocal data, dense_row
        if data is None:
            data = prunekit.load_dataset(settings.data)
        if dense_row is None:
            dense_row = dense_summary(dense, data, settings)
            cache.put(f"{model_name}__dense", sdict, dense_row)
        if tool == "torch-pruning":
            trajectory = prune_torch_pruning(dense, data, method, todo, s, progress)
        for factor in todo:
            bar.set_postfix_str(f"{model_name} {tool} {method} x{factor:g} seed {s.seed}")
            t0 = time.perf_counter()
            if tool == "prunekit":
                net, info = prune_prunekit(dense, data, method, factor, s)
                seconds = time.perf_counter() - t0
            else:
                net, info = trajectory.pop(factor)
                recalibrate_batchnorm_(net, data, s.bn_recalibration_images)
                seconds = info["seconds"] + time.perf_counter() - t0
            row = finish_row(model_name, tool, method, factor, dense, net, data, s, dense_row, seconds, info,
                             progress)
            cache.put(row_key(model_name, tool, method, factor, seed=s.seed), s.to_dict(), row)
            rows.append(row)
            log(f"{model_name} {tool:>13} {method:>6} x{factor:g} seed {s.seed}: FLOPs {row['flops_reduction']:.2f}x, "
                f"speedup {row['latency_speedup']:.2f}x (ratio {row['speedup_per_flops_reduction']:.2f}), "
                f"test acc {row['test_acc_pruned']:.4f} -> {row['test_acc']:.4f}")
            bar.update(1)

    for tool, method in jobs:
        todo = [f for f in factors if found[(tool, method, f)] is None]
        if todo:
            run(tool, method, todo, settings)
    for factor in seed_factors:
        for tool in dict.fromkeys(t for t, _ in jobs):
            method = best_criterion(rows, model_name, tool, factor)
            for seed in extra_seeds:
                s = seeded(settings, seed)
                row = cache.get(row_key(model_name, tool, method, factor, seed=seed), s.to_dict())
                if row is None:
                    run(tool, method, [factor], s)
                else:
                    rows.append(row)
    if dense_row is None:
        data = data or prunekit.load_dataset(settings.data)
        dense_row = dense_summary(dense, data, settings)
        cache.put(f"{model_name}__dense", sdict, dense_row)
    return {**dense_row, "settings": sdict}, rows


def best_criterion(rows: list[dict[str, Any]], model: str, tool: str, factor: float) -> str:
    """The criterion of ``tool`` with the highest seed-0 validation accuracy at ``factor`` (never test)."""
    mine = [r for r in rows if (r["model"], r["tool"], r["factor"], r.get("seed", 0)) == (model, tool, factor, 0)]
    if not mine:
        raise SystemExit(f"structured.py: error: no {tool} row of {model} at x{factor:g} to choose a criterion from; "
                         "--seed-factors must be among --factors")
    return max(mine, key=lambda r: r["val_acc"])["method"]


def remeasure_latency(model_name: str, checkpoint: Path, rows: list[dict[str, Any]], base: Settings,
                      cache: RowCache, progress: bool, log: Callable[[str], None]) -> None:
    """Measure the latency of every cached row again, on a machine nothing else is using.

    Pruning is deterministic (seeded scores, batches and trajectories) and fine-tuning does not change the
    architecture, so re-pruning the dense checkpoint without fine-tuning rebuilds each row's network; its
    parameter and FLOPs counts are checked against the row before the new latencies replace the old ones (weights
    do not change dense-kernel latency). Rows get ``latency_remeasured: true``.
    """
    dense, _, settings = model_settings(checkpoint, base)
    sdict = settings.to_dict()
    data = prunekit.load_dataset(settings.data)
    shape = (data.in_channels, data.input_size, data.input_size)
    mine = [r for r in rows if r["model"] == model_name]
    trajectories = {}
    for r in tqdm(mine, desc=f"{model_name} latency", disable=not progress, leave=False):
        s = seeded(settings, r.get("seed", 0))
        key = row_key(model_name, r["tool"], r["method"], r["factor"], seed=s.seed)
        if r["tool"] == "prunekit":
            net, _ = prune_prunekit(dense, data, r["method"], r["factor"], s)
        else:
            path = (r["method"], s.seed)
            if path not in trajectories:
                factors = sorted(x["factor"] for x in mine if x["tool"] == r["tool"] and x["method"] == r["method"]
                                 and x.get("seed", 0) == s.seed)
                trajectories[path] = prune_torch_pruning(dense, data, r["method"], factors, s, False)
            net = trajectories[path][r["factor"]][0]
        net.eval()
        got = (prunekit.count_params(net), prunekit.count_flops(net, (1, *shape)))
        if got != (r["params"], r["flops"]):
            raise SystemExit(f"structured.py: error: re-pruning {key} gave {got} params/FLOPs, the cached row has "
                             f"{(r['params'], r['flops'])}; delete its cache file and run it again")
        lat_dense, lat_pruned = dense_pruned_latency(dense, net, shape, settings)
        speedup = lat_dense / lat_pruned
        r.update(latency_dense_ms=lat_dense, latency_pruned_ms=lat_pruned, latency_speedup=speedup,
                 speedup_per_flops_reduction=speedup / r["flops_reduction"], latency_threads=torch.get_num_threads(),
                 latency_remeasured=True)
        cache.put(key, s.to_dict(), r)
        log(f"{model_name} {r['tool']:>13} {r['method']:>6} x{r['factor']:g} seed {s.seed}: speedup {speedup:.2f}x "
            f"(ratio {r['speedup_per_flops_reduction']:.2f})")
    dense_row = cache.get(f"{model_name}__dense", sdict)
    if dense_row is not None:
        dense_row["latency_ms"] = statistics.median(r["latency_dense_ms"] for r in mine) if mine else \
            dense_row["latency_ms"]
        cache.put(f"{model_name}__dense", sdict, dense_row)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(["python", "benchmarks/structured.py", *(sys.argv[1:] if argv is None else argv)])
    progress = not args.no_progress
    log = (lambda msg: tqdm.write(msg)) if progress else print
    out: Path = args.out
    cache, paths, base = run_setup(args, log)
    jobs = [(tool, method) for tool, methods in (("prunekit", args.methods), ("torch-pruning", args.tp_methods))
            for method in methods]
    rows: list[dict[str, Any]] = []
    dense_rows: dict[str, dict[str, Any]] = {}
    bar = tqdm(total=len(args.models) * len(args.factors) * len(jobs), desc="rows", disable=not progress,
               dynamic_ncols=True)
    for model_name in args.models:
        dense_row, model_rows = run_model(model_name, paths[model_name], jobs, args.factors, base, cache, bar,
                                          progress, log, args.extra_seeds, args.seed_factors)
        if args.remeasure_latency:
            remeasure_latency(model_name, paths[model_name], model_rows, base, cache, progress, log)
            dense_row = {**cache.get(f"{model_name}__dense", dense_row["settings"]), "settings": dense_row["settings"]}
        dense_rows[model_name] = {**dense_row, "checkpoint": str(paths[model_name])}
        rows += model_rows
    bar.close()
    coverage = ({"notes": ["coverage skipped (--no-coverage)"], "architectures": {}}
                if args.no_coverage else run_coverage(progress, log))
    order = {job: i for i, job in enumerate(jobs)}
    rows.sort(key=lambda r: (args.models.index(r["model"]), r["factor"], order[(r["tool"], r["method"])],
                             r.get("seed", 0)))
    write_outputs(out, command, rows, dense_rows, coverage, args.quick)
    print(results_table(rows, dense_rows))
    print()
    print(coverage_table(coverage))
    print(f"\nwrote {out / 'structured.md'}, structured.json, structured_accuracy_vs_flops.png, coverage.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
