"""Structured (channel) pruning, prunekit vs Torch-Pruning, on the dense Fashion-MNIST baselines.

For every model, FLOPs-reduction target (x2, x4, x8) and criterion, both tools prune the same dense checkpoint and
then get exactly the same treatment, so only the pruning differs:

* BatchNorm statistics re-estimated on 512 training images (``prunekit.methods.channel.recalibrate_batchnorm_``), then
  validation/test accuracy "right after pruning";
* fine-tuning with ``prunekit.training.fit`` (SGD lr 0.01, cosine, batch 128, crop+flip, seed 0, ``--finetune-epochs``
  epochs); the reported test accuracy is that of the best-on-validation epoch;
* parameters and FLOPs by ``prunekit.measurement.metrics`` (FLOPs = 2 x MACs of convolutions and matrix products);
* CPU latency at batch 64 by ``prunekit.measurement.metrics.measure_latency``, dense and pruned measured back to
  back in this process (alternated ``--latency-repeats`` times, medians kept); speedup = dense ms / pruned ms and
  ratio = speedup / FLOPs reduction (1.0 means the FLOPs saving turns fully into wall-clock time).

prunekit (``prunekit.methods.channel.prune_model``): one-shot, global allocation of per-group mean-normalised
scores, at most 90% of a group removed; the plan meets the FLOPs target exactly (exact cost model, within 2%).

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

    python benchmarks/structured.py                      # the full benchmark (both models, x2 x4 x8, all criteria)
    python benchmarks/structured.py --quick --out /tmp/q # seconds on 2 cores: digits, a small ResNet-20, x2
    python benchmarks/structured.py --remeasure-latency  # latency of every cached row again, on an idle machine

Latency uses torch's default thread count (``--threads`` to change it; ``--quick`` uses 1): several threads on a
machine that other jobs keep busy make small convolutions many times slower, so run the full benchmark on an idle
machine or with ``--threads 1``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn
from tqdm.auto import tqdm

from prunekit.channels.graph import ChannelGraph, ChannelPlan, SliceKind, find_output_layers
from prunekit.data import DataConfig, DataSplits, load_dataset
from prunekit.jobs import load_dense
from prunekit.measurement.metrics import count_flops, count_params, measure_latency
from prunekit.methods.channel import PruneConfig, layer_widths, prune_model, recalibrate_batchnorm_, score_batches
from prunekit.models import ModelConfig, create_model, list_models
from prunekit.persistence.checkpoint import atomic_write, save_checkpoint
from prunekit.planning.allocation import AllocationConfig, Target
from prunekit.training import Augment, TrainConfig, evaluate, fit

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT_DIR = ROOT / "benchmarks" / "checkpoints"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "structured"
CHECKPOINTS = {"resnet20": "resnet20-fmnist.safetensors", "vgg11": "vgg11-fmnist.safetensors"}
OUR_METHODS = ("l1", "l2", "bn", "taylor", "random")
TP_IMPORTANCES: dict[str, Callable[[], Any]] = {
    "l1": lambda: tp.importance.MagnitudeImportance(p=1),
    "l2": lambda: tp.importance.MagnitudeImportance(p=2),
    "bn": lambda: tp.importance.BNScaleImportance(),
    "taylor": lambda: tp.importance.TaylorImportance(),
    "random": lambda: tp.importance.RandomImportance(),
}
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


# ------------------------------------------------------------------------------------------------ settings


@dataclass(frozen=True)
class Settings:
    """Everything a row depends on besides (model, tool, method, factor); a cached row is reused only if equal."""

    finetune: TrainConfig
    data: DataConfig
    checkpoint_sha256: str
    bn_recalibration_images: int = 512
    score_batches: int = 8
    max_per_layer: float = 0.9
    tp_iterative_steps: int = 400
    latency_batch: int = 64
    latency_repeats: int = 3
    latency_min_run_time: float = 0.5
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["finetune"], d["data"] = self.finetune.to_dict(), self.data.to_dict()
        d["torch_pruning"] = tp.__version__
        d["threads"] = torch.get_num_threads()
        return d


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _quiet(_: str) -> None:
    pass


# ----------------------------------------------------------------------------------------------- the models


def checkpoint_paths(models: Iterable[str], checkpoint_dir: Path) -> dict[str, Path]:
    """The committed dense checkpoint of each model; a clear error when one is missing."""
    unknown = [m for m in models if m not in CHECKPOINTS]
    if unknown:
        raise SystemExit(f"structured.py: error: unknown --models {unknown}; accepted: {sorted(CHECKPOINTS)}")
    paths = {m: checkpoint_dir / CHECKPOINTS[m] for m in models}
    missing = [p for p in paths.values() if not p.is_file()]
    if missing:
        names = " ".join(m for m, p in paths.items() if p in missing)
        raise SystemExit(
            f"structured.py: error: dense checkpoint(s) missing: {', '.join(str(p) for p in missing)}. Train them "
            f"with `bash benchmarks/checkpoints/train_baselines.sh {names}` (or point --checkpoint-dir at them); "
            "`--quick` runs without them")
    return paths


def quick_dense(cache: Path, data: DataConfig, log: Callable[[str], None]) -> Path:
    """A small ResNet-20 (width 0.5) trained for a few epochs on ``data``, saved once under ``cache``."""
    path = cache / f"quick-dense-resnet20{f'-limit{data.limit}' if data.limit else ''}.safetensors"
    if path.is_file():
        return path
    splits = load_dataset(data)
    torch.manual_seed(0)
    config = ModelConfig(name="resnet20", num_classes=splits.num_classes, in_channels=splits.in_channels,
                         input_size=splits.input_size, width=0.5)
    net = create_model(config)
    log("quick: training the dense resnet20 (width 0.5) on digits")
    fit(net, splits, TrainConfig(epochs=6, lr=0.05, batch_size=64, augment=Augment.CROP, seed=0), progress=False)
    save_checkpoint(path, net.eval(), {"model": config.to_dict(), "data": data.to_dict()})
    return path


# ------------------------------------------------------------------------------------------------ pruning


def prune_prunekit(dense: nn.Module, data: DataSplits, method: str, factor: float, s: Settings
                   ) -> tuple[nn.Module, dict[str, Any]]:
    """prunekit one-shot to keep 1/factor of the FLOPs; BatchNorm re-estimated inside ``prune_model``."""
    torch.manual_seed(s.seed)
    config = PruneConfig(method=method, target=Target("flops", 1.0 / factor),
                         allocation=AllocationConfig("global", s.max_per_layer), score_batches=s.score_batches,
                         bn_recalibration_images=s.bn_recalibration_images, seed=s.seed,
                         reconstruction_images=0)  # criteria compared as Torch-Pruning runs them: no re-fit
    result = prune_model(copy.deepcopy(dense).train(), data, config, None, progress=False, log=_quiet)
    r = result.rounds[-1]
    return result.model, {"predicted_keep": r.predicted_keep, "removed_channels": r.removed_channels}


def prune_torch_pruning(dense: nn.Module, data: DataSplits, method: str, factors: Iterable[float], s: Settings,
                        progress: bool = True) -> dict[float, tuple[nn.Module, dict[str, Any]]]:
    """Torch-Pruning's own progressive recipe: small global steps until its MAC counter shows each target.

    Returns a pruned copy per factor (BatchNorm not yet re-estimated); one trajectory serves all factors.
    """
    t0 = time.perf_counter()
    torch.manual_seed(s.seed)
    net = copy.deepcopy(dense).eval()
    example = data.train[:2][0]
    modules = dict(net.named_modules())
    ignored = [modules[n] for n in find_output_layers(net, example)]
    if method == "taylor":
        net.zero_grad(set_to_none=True)
        for x, y in score_batches(data, s.score_batches, s.seed + 1):  # round 1's batches, as prunekit's
            F.cross_entropy(net(x), y).backward()
    pruner = tp.pruner.BasePruner(
        net, example, importance=TP_IMPORTANCES[method](), global_pruning=True, pruning_ratio=1.0,
        iterative_steps=s.tp_iterative_steps, max_pruning_ratio=s.max_per_layer, ignored_layers=ignored)
    base_macs = tp.utils.count_ops_and_params(net, example[:1])[0]
    macs = base_macs
    out: dict[float, tuple[nn.Module, dict[str, Any]]] = {}
    bar = tqdm(total=s.tp_iterative_steps, desc=f"torch-pruning {method} steps", leave=False,
               disable=not progress, dynamic_ncols=True)
    for factor in sorted(factors):
        while base_macs / macs < factor and pruner.current_step < pruner.iterative_steps:
            pruner.step()
            macs = tp.utils.count_ops_and_params(net, example[:1])[0]
            bar.update(1)
            bar.set_postfix(reduction=f"{base_macs / macs:.2f}x")
        snapshot = copy.deepcopy(net)
        snapshot.zero_grad(set_to_none=True)
        out[factor] = (snapshot, {"steps": pruner.current_step, "tp_macs_reduction": base_macs / macs,
                                  "target_reached": base_macs / macs >= factor,
                                  "seconds": time.perf_counter() - t0})
    bar.close()
    return out


# ---------------------------------------------------------------------------------------------- measuring


def paired_latency(dense: nn.Module, pruned: nn.Module, shape: tuple[int, ...], s: Settings) -> tuple[float, float]:
    """Median batch latency (ms) of dense and pruned, measured alternately, back to back, after an untimed round of
    both (the first pruned row of a process measured up to 2x slow without it)."""
    for net in (dense, pruned):
        measure_latency(net, shape, s.latency_batch, min_run_time=s.latency_min_run_time)
    d, p = [], []
    for _ in range(s.latency_repeats):
        d.append(measure_latency(dense, shape, s.latency_batch, min_run_time=s.latency_min_run_time).median_ms)
        p.append(measure_latency(pruned, shape, s.latency_batch, min_run_time=s.latency_min_run_time).median_ms)
    return statistics.median(d), statistics.median(p)


def finish_row(model_name: str, tool: str, method: str, factor: float, dense: nn.Module, net: nn.Module,
               data: DataSplits, s: Settings, dense_row: dict[str, Any], seconds_prune: float,
               tool_info: dict[str, Any], progress: bool) -> dict[str, Any]:
    """Accuracy after pruning, identical fine-tuning, then size, FLOPs and paired latency."""
    shape = (data.in_channels, data.input_size, data.input_size)
    val_pruned, test_pruned = evaluate(net, data.val)["acc"], evaluate(net, data.test)["acc"]
    t0 = time.perf_counter()
    torch.manual_seed(s.seed)
    result = fit(net, data, s.finetune, progress=progress)
    seconds_finetune = time.perf_counter() - t0
    net.eval()
    params, flops = count_params(net), count_flops(net, (1, *shape))
    lat_dense, lat_pruned = paired_latency(dense, net, shape, s)
    speedup = lat_dense / lat_pruned
    reduction = dense_row["flops"] / flops
    return {
        "model": model_name, "tool": tool, "method": method, "factor": factor,
        "params": params, "flops": flops, "dense_params": dense_row["params"], "dense_flops": dense_row["flops"],
        "flops_reduction": reduction, "params_reduction": dense_row["params"] / params,
        "latency_dense_ms": lat_dense, "latency_pruned_ms": lat_pruned, "latency_speedup": speedup,
        "speedup_per_flops_reduction": speedup / reduction, "latency_batch": s.latency_batch,
        "latency_threads": torch.get_num_threads(),
        "val_acc_pruned": val_pruned, "test_acc_pruned": test_pruned,
        "val_acc": result.best_val_acc, "test_acc": evaluate(net, data.test)["acc"], "best_epoch": result.best_epoch,
        "dense_test_acc": dense_row["test_acc"], "seconds_prune": seconds_prune,
        "seconds_finetune": seconds_finetune, "tool_info": tool_info, "history": result.history,
    }


def dense_summary(dense: nn.Module, data: DataSplits, s: Settings) -> dict[str, Any]:
    shape = (data.in_channels, data.input_size, data.input_size)
    return {"params": count_params(dense), "flops": count_flops(dense, (1, *shape)),
            "val_acc": evaluate(dense, data.val)["acc"], "test_acc": evaluate(dense, data.test)["acc"],
            "latency_ms": measure_latency(dense, shape, s.latency_batch, min_run_time=s.latency_min_run_time).median_ms,
            "latency_batch": s.latency_batch, "latency_threads": torch.get_num_threads(),
            "widths": layer_widths(dense)}


# --------------------------------------------------------------------------------------------------- cache


class RowCache:
    """One JSON file per finished row under ``directory``, stored with the settings that produced it."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.json"

    def get(self, key: str, settings: dict[str, Any]) -> dict[str, Any] | None:
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            stored = json.loads(path.read_text())
        except json.JSONDecodeError:
            return None
        return stored["row"] if stored.get("settings") == settings else None

    def put(self, key: str, settings: dict[str, Any], row: dict[str, Any]) -> None:
        text = json.dumps({"settings": settings, "row": row}, indent=1)
        atomic_write(self.path(key), lambda tmp: Path(tmp).write_text(text))

    def get_or_run(self, key: str, settings: dict[str, Any], run, *run_args, announce: str = "") -> dict[str, Any]:
        """The cached row, or ``run(*run_args)``'s, cached at once and announced as ``announce.format(**row)``."""
        row = self.get(key, settings)
        if row is None:
            row = run(*run_args)
            self.put(key, settings, row)
            if announce:
                print(announce.format(**row), flush=True)
        return row


def row_key(model: str, tool: str, method: str, factor: float) -> str:
    return f"{model}__{tool}__{method}__x{factor:g}"


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
    (``"out"``) and at the input of every layer that reads them (``"in"``); ``model`` itself is not changed."""
    modules = dict(model.named_modules())
    handles = []
    for name, kind, idxs in removals:
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
    return sum(layer_widths(model).values())


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
                    removals.append((m.name, "out" if m.kind is SliceKind.OUT else "in", hit))
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
    for name in list_models() if zoo is None else zoo:
        config = ModelConfig(name=name, num_classes=10, in_channels=3, input_size=8, width=0.25)
        archs[name] = ("zoo", lambda c=config: create_model(c), (3, 8, 8))
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


def _fmt_acc(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def results_table(rows: list[dict[str, Any]], dense: dict[str, dict[str, Any]]) -> str:
    header = ["model", "tool", "criterion", "target", "params", "MFLOPs", "FLOPs red.",
              "latency b64 ms (dense / pruned)", "speedup", "speedup / FLOPs red.", "test acc after pruning %",
              "test acc fine-tuned %"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model, d in dense.items():
        lines.append(f"| {model} | dense | - | - | {d['params']:,} | {d['flops'] / 1e6:.2f} | 1.00x | "
                     f"{d['latency_ms']:.2f} | 1.00x | - | - | {_fmt_acc(d['test_acc'])} |")
        for r in rows:
            if r["model"] != model:
                continue
            ok = "" if r["speedup_per_flops_reduction"] >= 0.8 else " (< 0.8)"
            lines.append(
                f"| {model} | {r['tool']} | {r['method']} | x{r['factor']:g} | {r['params']:,} | "
                f"{r['flops'] / 1e6:.2f} | {r['flops_reduction']:.2f}x | "
                f"{r['latency_dense_ms']:.2f} / {r['latency_pruned_ms']:.2f} | "
                f"{r['latency_speedup']:.2f}x | {r['speedup_per_flops_reduction']:.2f}{ok} | "
                f"{_fmt_acc(r['test_acc_pruned'])} | {_fmt_acc(r['test_acc'])} |")
    return "\n".join(lines)


def comparison_table(rows: list[dict[str, Any]]) -> str:
    """The two tools side by side per (model, target, criterion): fine-tuned test accuracy and speedup / FLOPs
    reduction (the table the README shows)."""
    by = {(r["model"], r["factor"], r["method"], r["tool"]): r for r in rows}
    header = ["model", "FLOPs target", "criterion", "test acc % prunekit", "test acc % Torch-Pruning",
              "speedup / FLOPs red. prunekit", "speedup / FLOPs red. Torch-Pruning"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model, factor, method in dict.fromkeys((r["model"], r["factor"], r["method"]) for r in rows):
        ours, theirs = by.get((model, factor, method, "prunekit")), by.get((model, factor, method, "torch-pruning"))

        def cell(r, key, fmt):
            return "-" if r is None else fmt(r[key])

        lines.append(f"| {model} | x{factor:g} | {method} | {cell(ours, 'test_acc', _fmt_acc)} | "
                     f"{cell(theirs, 'test_acc', _fmt_acc)} | "
                     f"{cell(ours, 'speedup_per_flops_reduction', lambda v: f'{v:.2f}')} | "
                     f"{cell(theirs, 'speedup_per_flops_reduction', lambda v: f'{v:.2f}')} |")
    return "\n".join(lines)


def coverage_table(coverage: dict[str, Any]) -> str:
    lines = ["| architecture | source | prunekit | Torch-Pruning |", "|---|---|---|---|"]
    for name, cell in coverage["architectures"].items():
        lines.append(f"| {name} | {cell['source']} | {coverage_label(cell['prunekit']).replace('|', '/')} | "
                     f"{coverage_label(cell['torch-pruning']).replace('|', '/')} |")
    return "\n".join(lines)


def plot_accuracy_vs_flops(rows: list[dict[str, Any]], dense: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    models = list(dense)
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.2), squeeze=False)
    methods = sorted({r["method"] for r in rows})
    colors = {m: f"C{i}" for i, m in enumerate(methods)}
    for ax, model in zip(axes[0], models):
        for tool, style, marker in (("prunekit", "-", "o"), ("torch-pruning", "--", "s")):
            for method in methods:
                pts = sorted((r["flops"] / 1e6, r["test_acc"]) for r in rows
                             if r["model"] == model and r["tool"] == tool and r["method"] == method)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker=marker, color=colors[method],
                            label=f"{tool} {method}")
        d = dense[model]
        ax.scatter([d["flops"] / 1e6], [d["test_acc"]], marker="*", s=160, color="black", label="dense", zorder=5)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.set_xlabel("MFLOPs (log)")
        ax.set_ylabel("test accuracy (best-on-validation epoch)")
        ax.set_title(model)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _git_commit() -> str | None:
    head = ROOT / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            return (ROOT / ".git" / ref[5:]).read_text().strip()
        return ref
    except OSError:
        return None


def write_outputs(out: Path, command: str, rows: list[dict[str, Any]], dense: dict[str, dict[str, Any]],
                  coverage: dict[str, Any], quick: bool) -> None:
    """structured.json, structured.md, structured_accuracy_vs_flops.png and coverage.json under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    payload = {"command": command, "quick": quick, "git_commit": _git_commit(), "torch": torch.__version__,
               "torch_pruning": tp.__version__, "threads": torch.get_num_threads(), "row_fields": list(ROW_FIELDS),
               "dense": dense, "rows": rows}
    atomic_write(out / "structured.json", lambda tmp: Path(tmp).write_text(json.dumps(payload, indent=1)))
    atomic_write(out / "coverage.json", lambda tmp: Path(tmp).write_text(json.dumps(coverage, indent=1)))
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
        f"images, then {ft['epochs']} fine-tuning epoch(s) with prunekit's `fit` (SGD lr {ft['lr']}, "
        f"{ft['schedule']}, batch {ft['batch_size']}, {ft['augment']}, seed {ft['seed']}); *test acc fine-tuned* is "
        "the test accuracy of the best-on-validation epoch, *after pruning* is measured after BatchNorm "
        f"re-estimation, before any training. prunekit: one-shot `prune_model`, global allocation, at most "
        f"{s['max_per_layer']:.0%} of a group. Torch-Pruning: `tp.pruner.BasePruner`, `global_pruning=True`, "
        f"`pruning_ratio=1.0` over {s['tp_iterative_steps']} steps (importance re-estimated on the shrinking "
        f"network at each step), stepped until its own MAC counter (`tp.utils.count_ops_and_params`) shows the "
        f"target, `max_pruning_ratio={s['max_per_layer']}`; Taylor gradients from the same {s['score_batches']} "
        f"batches of 64 prunekit's Taylor scores with. FLOPs "
        f"counted by `prunekit.measurement.metrics.count_flops` for both. Latency: batch {s['latency_batch']}, "
        "dense and pruned "
        f"measured alternately {s['latency_repeats']} time(s) in the same process (medians); the target for speedup "
        "/ FLOPs reduction is >= 0.8.",
        "",
        "## Side by side", "",
        comparison_table(rows),
        "",
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
    atomic_write(out / "structured.md", lambda tmp: Path(tmp).write_text("\n".join(text).rstrip() + "\n"))


# ------------------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="structured.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=None, help=f"default: {' '.join(CHECKPOINTS)}")
    p.add_argument("--factors", nargs="+", type=float, default=None, help="FLOPs reduction targets (default 2 4 8)")
    p.add_argument("--methods", nargs="*", default=None, help=f"prunekit criteria (default: {' '.join(OUR_METHODS)})")
    p.add_argument("--tp-methods", nargs="*", default=None,
                   help=f"Torch-Pruning importances (default: {' '.join(TP_IMPORTANCES)})")
    p.add_argument("--finetune-epochs", type=int, default=1)
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
    for name, default in (("models", list(CHECKPOINTS)), ("factors", [2.0, 4.0, 8.0]),
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
              base: Settings, cache: RowCache, bar: tqdm, progress: bool, log: Callable[[str], None]
              ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The dense row and every (tool, criterion, factor) row of one model, from the cache where possible."""
    dense, _, data_cfg = load_dense(None, checkpoint, None)
    if base.data.limit is not None:
        data_cfg = replace(data_cfg, limit=base.data.limit)
    settings = replace(base, data=data_cfg, checkpoint_sha256=_sha256(checkpoint))
    sdict = settings.to_dict()
    dense_row = cache.get(f"{model_name}__dense", sdict)
    found = {(tool, method, f): cache.get(row_key(model_name, tool, method, f), sdict)
             for tool, method in jobs for f in factors}
    rows = [r for r in found.values() if r is not None]
    bar.update(len(rows))
    if dense_row is not None and len(rows) == len(found):
        return {**dense_row, "settings": sdict}, rows
    data = load_dataset(data_cfg)
    if dense_row is None:
        dense_row = dense_summary(dense, data, settings)
        cache.put(f"{model_name}__dense", sdict, dense_row)
    for tool, method in jobs:
        todo = [f for f in factors if found[(tool, method, f)] is None]
        if not todo:
            continue
        if tool == "torch-pruning":
            trajectory = prune_torch_pruning(dense, data, method, todo, settings, progress)
        for factor in todo:
            bar.set_postfix_str(f"{model_name} {tool} {method} x{factor:g}")
            t0 = time.perf_counter()
            if tool == "prunekit":
                net, info = prune_prunekit(dense, data, method, factor, settings)
                seconds = time.perf_counter() - t0
            else:
                net, info = trajectory.pop(factor)
                recalibrate_batchnorm_(net, data, settings.bn_recalibration_images)
                seconds = info["seconds"] + time.perf_counter() - t0
            row = finish_row(model_name, tool, method, factor, dense, net, data, settings, dense_row, seconds, info,
                             progress)
            cache.put(row_key(model_name, tool, method, factor), sdict, row)
            rows.append(row)
            log(f"{model_name} {tool:>13} {method:>6} x{factor:g}: FLOPs {row['flops_reduction']:.2f}x, "
                f"speedup {row['latency_speedup']:.2f}x (ratio {row['speedup_per_flops_reduction']:.2f}), "
                f"test acc {row['test_acc_pruned']:.4f} -> {row['test_acc']:.4f}")
            bar.update(1)
    return {**dense_row, "settings": sdict}, rows


def remeasure_latency(model_name: str, checkpoint: Path, rows: list[dict[str, Any]], base: Settings,
                      cache: RowCache, progress: bool, log: Callable[[str], None]) -> None:
    """Measure the latency of every cached row again, on a machine nothing else is using.

    Pruning is deterministic (seeded scores, batches and trajectories) and fine-tuning does not change the
    architecture, so re-pruning the dense checkpoint without fine-tuning rebuilds each row's network; its
    parameter and FLOPs counts are checked against the row before the new latencies replace the old ones (weights
    do not change dense-kernel latency). Rows get ``latency_remeasured: true``.
    """
    dense, _, data_cfg = load_dense(None, checkpoint, None)
    if base.data.limit is not None:
        data_cfg = replace(data_cfg, limit=base.data.limit)
    settings = replace(base, data=data_cfg, checkpoint_sha256=_sha256(checkpoint))
    sdict = settings.to_dict()
    data = load_dataset(data_cfg)
    shape = (data.in_channels, data.input_size, data.input_size)
    mine = [r for r in rows if r["model"] == model_name]
    trajectories = {}
    for r in tqdm(mine, desc=f"{model_name} latency", disable=not progress, leave=False):
        if r["tool"] == "prunekit":
            net, _ = prune_prunekit(dense, data, r["method"], r["factor"], settings)
        else:
            if r["method"] not in trajectories:
                factors = sorted(x["factor"] for x in mine if x["tool"] == r["tool"] and x["method"] == r["method"])
                trajectories[r["method"]] = prune_torch_pruning(dense, data, r["method"], factors, settings, False)
            net = trajectories[r["method"]][r["factor"]][0]
        net.eval()
        got = (count_params(net), count_flops(net, (1, *shape)))
        if got != (r["params"], r["flops"]):
            key = row_key(model_name, r["tool"], r["method"], r["factor"])
            raise SystemExit(f"structured.py: error: re-pruning {key} gave {got} params/FLOPs, the cached row has "
                             f"{(r['params'], r['flops'])}; delete its cache file and run it again")
        lat_dense, lat_pruned = paired_latency(dense.eval(), net, shape, settings)
        speedup = lat_dense / lat_pruned
        r.update(latency_dense_ms=lat_dense, latency_pruned_ms=lat_pruned, latency_speedup=speedup,
                 speedup_per_flops_reduction=speedup / r["flops_reduction"], latency_threads=torch.get_num_threads(),
                 latency_remeasured=True)
        cache.put(row_key(model_name, r["tool"], r["method"], r["factor"]), sdict, r)
        log(f"{model_name} {r['tool']:>13} {r['method']:>6} x{r['factor']:g}: speedup {speedup:.2f}x "
            f"(ratio {r['speedup_per_flops_reduction']:.2f})")
    dense_row = cache.get(f"{model_name}__dense", sdict)
    if dense_row is not None:
        dense_row["latency_ms"] = statistics.median(r["latency_dense_ms"] for r in mine) if mine else \
            dense_row["latency_ms"]
        cache.put(f"{model_name}__dense", sdict, dense_row)


def run_setup(args: argparse.Namespace, log: Callable[[str], None]) -> tuple[RowCache, dict[str, Path], Settings]:
    """Threads, the row cache under ``args.out``, the dense checkpoints (``--quick``: a small digits ResNet-20
    trained once) and the settings every row shares; used by the other benchmark scripts too."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cache = RowCache(args.out / "cache")
    if args.quick:
        paths = {"resnet20": quick_dense(cache.directory, DataConfig(name="digits", limit=args.limit), log)}
    else:
        paths = checkpoint_paths(args.models, args.checkpoint_dir)
    base = Settings(
        finetune=TrainConfig(epochs=args.finetune_epochs, lr=0.01, batch_size=128, augment=Augment.CROP_FLIP, seed=0),
        data=DataConfig(name="digits", limit=args.limit), checkpoint_sha256="",
        latency_repeats=getattr(args, "latency_repeats", 3), latency_min_run_time=0.1 if args.quick else 0.5)
    return cache, paths, base


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
                                          progress, log)
        if args.remeasure_latency:
            remeasure_latency(model_name, paths[model_name], model_rows, base, cache, progress, log)
            dense_row = {**cache.get(f"{model_name}__dense", dense_row["settings"]), "settings": dense_row["settings"]}
        dense_rows[model_name] = {**dense_row, "checkpoint": str(paths[model_name])}
        rows += model_rows
    bar.close()
    coverage = ({"notes": ["coverage skipped (--no-coverage)"], "architectures": {}}
                if args.no_coverage else run_coverage(progress, log))
    order = {job: i for i, job in enumerate(jobs)}
    rows.sort(key=lambda r: (args.models.index(r["model"]), r["factor"], order[(r["tool"], r["method"])]))
    write_outputs(out, command, rows, dense_rows, coverage, args.quick)
    print(results_table(rows, dense_rows))
    print()
    print(coverage_table(coverage))
    print(f"\nwrote {out / 'structured.md'}, structured.json, structured_accuracy_vs_flops.png, coverage.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
