"""What the benchmark scripts share; each script is otherwise a thin program on prunekit's public API.

* the per-row result cache (:class:`RowCache`), checkpoint lookup and hashing, the git commit of a result;
* the small digits networks that ``--quick`` prunes instead of the committed Fashion-MNIST checkpoints;
* method configs built through the registry (:func:`method_config`) and one pruning call (:func:`prune_copy`);
* the channel-pruning rows of ``structured.py`` and ``eigendamage.py``: their settings, the Torch-Pruning recipe
  they compare against, dense summary, fine-tuning, paired latency (``prunekit.measurement.latency``) and plot.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn
from tqdm.auto import tqdm

import prunekit
from prunekit.channels.graph import find_output_layers
from prunekit.data import DataConfig, DataSplits
from prunekit.jobs import load_dense
from prunekit.measurement.latency import forward_runner, measure_latency, paired_latency, time_ms
from prunekit.methods.rounds import layer_widths, score_batches
from prunekit.persistence.checkpoint import atomic_write
from prunekit.training import FINETUNE_LR, FINETUNE_WARMUP, Augment, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT_DIR = ROOT / "benchmarks" / "checkpoints"
CHECKPOINTS = {"resnet20": "resnet20-fmnist.safetensors", "vgg11": "vgg11-fmnist.safetensors",
               "lenet5": "lenet5-fmnist.safetensors", "lenet300": "lenet300-fmnist.safetensors"}
CONV_MODELS = ("resnet20", "vgg11")  # the channel-pruning benchmarks' models
LENETS = ("lenet5", "lenet300")  # the weight-pruning benchmarks' models
# --quick: a small network trained once on digits (width, training)
QUICK_DENSE = {"resnet20": (0.5, TrainConfig(epochs=6, lr=0.05, batch_size=64, augment=Augment.CROP, seed=0)),
               "lenet5": (1.0, TrainConfig(epochs=8, lr=0.05, augment=Augment.CROP))}
TP_IMPORTANCES: dict[str, Callable[[], Any]] = {  # Torch-Pruning's importance for each structural criterion
    "l1": lambda: tp.importance.MagnitudeImportance(p=1),
    "l2": lambda: tp.importance.MagnitudeImportance(p=2),
    "bn": lambda: tp.importance.BNScaleImportance(),
    "taylor": lambda: tp.importance.TaylorImportance(),
    "random": lambda: tp.importance.RandomImportance(),
}
STRUCTURAL = tuple(TP_IMPORTANCES)  # the structural criteria both tools have


def quiet(*_: Any) -> None:
    pass


def prog() -> str:
    """The running script's name, for error messages."""
    return Path(sys.argv[0]).name


def sha256(path: Path) -> str:
    """The first 16 hex digits of a file's SHA-256 (what cached rows record of their checkpoint)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def git_commit() -> str | None:
    head = ROOT / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            return (ROOT / ".git" / ref[5:]).read_text().strip()
        return ref
    except OSError:
        return None


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path: Path, payload: Any) -> None:
    write_text(path, json.dumps(payload, indent=1))


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
        write_text(self.path(key), json.dumps({"settings": settings, "row": row}, indent=1))

    def get_or_run(self, key: str, settings: dict[str, Any], run, *run_args, announce: str = "") -> dict[str, Any]:
        """The cached row, or ``run(*run_args)``'s, cached at once and announced as ``announce.format(**row)``."""
        row = self.get(key, settings)
        if row is None:
            row = run(*run_args)
            self.put(key, settings, row)
            if announce:
                print(announce.format(**row), flush=True)
        return row


TARGET_KINDS = ("flops", "params")  # what a channel row's factor reduces: FLOPs, or parameters


def row_key(model: str, tool: str, method: str, factor: float, kind: str = "flops", seed: int = 0) -> str:
    """The cache key of a row; FLOPs targets and seed 0 keep the short key older result folders use."""
    return (f"{model}__{tool}__{method}__x{factor:g}" + ("" if kind == "flops" else f"__{kind}")
            + (f"__seed{seed}" if seed else ""))


# ----------------------------------------------------------------------------------------------- the models


def checkpoint_paths(models: Iterable[str], checkpoint_dir: Path, accepted: Iterable[str] = CONV_MODELS
                     ) -> dict[str, Path]:
    """The committed dense checkpoint of each model; a clear error when one is unknown or missing."""
    accepted = sorted(accepted)
    unknown = [m for m in models if m not in accepted]
    if unknown:
        raise SystemExit(f"{prog()}: error: unknown --models {unknown}; accepted: {accepted}")
    paths = {m: checkpoint_dir / CHECKPOINTS[m] for m in models}
    missing = [m for m, p in paths.items() if not p.is_file()]
    if missing:
        raise SystemExit(
            f"{prog()}: error: dense checkpoint(s) missing: {', '.join(str(paths[m]) for m in missing)}. Train them "
            f"with `bash benchmarks/checkpoints/train_baselines.sh {' '.join(missing)}` (or point --checkpoint-dir "
            "at them); `--quick` runs without them")
    return paths


def quick_dense(cache: Path, model: str = "resnet20", limit: int | None = None, log=quiet) -> Path:
    """The small ``model`` of :data:`QUICK_DENSE` trained on digits (the first ``limit`` images), saved once in
    ``cache``."""
    path = cache / f"quick-dense-{model}{f'-limit{limit}' if limit else ''}.safetensors"
    if path.is_file():
        return path
    data = DataConfig(name="digits", limit=limit)
    splits = prunekit.load_dataset(data)
    width, train = QUICK_DENSE[model]
    torch.manual_seed(0)
    config = prunekit.ModelConfig(name=model, num_classes=splits.num_classes, in_channels=splits.in_channels,
                                  input_size=splits.input_size, width=width)
    net = prunekit.create_model(config)
    log(f"quick: training the dense {model} (width {width:g}) on digits")
    prunekit.fit(net, splits, train, progress=False)
    prunekit.save_checkpoint(path, net.eval(), {"model": config.to_dict(), "data": data.to_dict()})
    return path


# ------------------------------------------------------------------------------------------------- pruning


def config_fields(method: str) -> set[str]:
    """The fields of the registered method's config class."""
    return {f.name for f in dataclasses.fields(prunekit.get_method(method).config)}


def method_config(method: str, **settings: Any):
    """The registered method's config from the ``settings`` it has (the others are left out): one call builds an
    L1, Taylor, Kron-OBS or EigenDamage config from the same benchmark settings."""
    known = config_fields(method)
    return prunekit.get_method(method).config(**{k: v for k, v in settings.items() if k in known})


def prune_copy(dense: nn.Module, config: Any, data: DataSplits, seed: int = 0,
               train: TrainConfig = TrainConfig(epochs=0, lr=0.01)) -> tuple[nn.Module, prunekit.PruneRecord]:
    """A copy of ``dense`` compressed by ``prunekit.prune_`` (the method is the config's type), seeded, silent;
    ``train`` gives the optimiser settings of a method that trains (its epochs come from the config)."""
    torch.manual_seed(seed)
    net = copy.deepcopy(dense).train()
    return net, prunekit.prune_(net, config, data, prunekit.RunContext(train=train, seed=seed, progress=False,
                                                                      log=quiet))


# ------------------------------------------------------------------- channel rows (structured, eigendamage)


@dataclass(frozen=True)
class Settings:
    """Everything a channel-pruning row depends on besides (model, tool, method, factor); a cached row is reused
    only if equal."""

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


def run_setup(args: argparse.Namespace, log: Callable[[str], None]) -> tuple[RowCache, dict[str, Path], Settings]:
    """Threads, the row cache under ``args.out``, the dense checkpoints (``--quick``: a small digits ResNet-20
    trained once) and the settings every row shares."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cache = RowCache(args.out / "cache")
    if args.quick:
        paths = {"resnet20": quick_dense(cache.directory, "resnet20", args.limit, log)}
    else:
        paths = checkpoint_paths(args.models, args.checkpoint_dir)
    base = Settings(
        finetune=TrainConfig(epochs=args.finetune_epochs, lr=FINETUNE_LR, warmup=FINETUNE_WARMUP, batch_size=128,
                             augment=Augment.CROP_FLIP, seed=0),
        data=DataConfig(name="digits", limit=args.limit), checkpoint_sha256="",
        latency_repeats=getattr(args, "latency_repeats", 3), latency_min_run_time=0.1 if args.quick else 0.5)
    return cache, paths, base


def seeded(s: Settings, seed: int) -> Settings:
    """``s`` for another seed: pruning's scoring batches and fine-tuning's shuffles and augmentation change."""
    return replace(s, seed=seed, finetune=replace(s.finetune, seed=seed))


def model_settings(checkpoint: Path, base: Settings) -> tuple[nn.Module, dict[str, Any], Settings]:
    """The dense network of ``checkpoint``, how to rebuild it, and ``base`` with its data and checkpoint hash."""
    dense, spec, data_cfg = load_dense(None, checkpoint, None)
    if base.data.limit is not None:
        data_cfg = replace(data_cfg, limit=base.data.limit)
    return dense, spec, replace(base, data=data_cfg, checkpoint_sha256=sha256(checkpoint))


def structural_config(method: str, keep: float, s: Settings, kind: str = "flops", **extra: Any):
    """The config of one-shot ``method`` keeping ``keep`` of the FLOPs (or of the parameters, ``kind="params"``)
    with the rows' settings: global allocation capped at ``s.max_per_layer``, BatchNorm re-estimated, no
    least-squares re-fit (the criteria alone, as Torch-Pruning runs them)."""
    return method_config(method, target=prunekit.Target(kind, keep),
                         allocation=prunekit.AllocationConfig("global", s.max_per_layer),
                         max_per_layer=s.max_per_layer, score_batches=s.score_batches,
                         bn_images=s.bn_recalibration_images, reconstruction_images=0, **extra)


def prune_torch_pruning(dense: nn.Module, data: DataSplits, method: str, factors: Iterable[float], s: Settings,
                        progress: bool = True, kind: str = "flops") -> dict[float, tuple[nn.Module, dict[str, Any]]]:
    """Torch-Pruning's own progressive recipe: small global steps until its counter
    (``tp.utils.count_ops_and_params``) shows each target, a MAC reduction or, ``kind="params"``, a parameter one.

    Returns a pruned copy per factor (BatchNorm not yet re-estimated); one trajectory serves all factors.
    """
    if kind not in TARGET_KINDS:
        raise ValueError(f"kind must be one of {TARGET_KINDS}, got {kind!r}")
    measured = 0 if kind == "flops" else 1  # count_ops_and_params returns (MACs, params)
    t0 = time.perf_counter()
    torch.manual_seed(s.seed)
    net = copy.deepcopy(dense).eval()
    example = data.train[:2][0]
    modules = dict(net.named_modules())
    ignored = [modules[n] for n in find_output_layers(net, example)]
    importance = TP_IMPORTANCES[method]()
    if isinstance(importance, tp.importance.TaylorImportance):  # it reads .grad
        net.zero_grad(set_to_none=True)
        for x, y in score_batches(data, s.score_batches, s.seed + 1):  # round 1's batches, as prunekit's
            F.cross_entropy(net(x), y).backward()
    pruner = tp.pruner.BasePruner(
        net, example, importance=importance, global_pruning=True, pruning_ratio=1.0,
        iterative_steps=s.tp_iterative_steps, max_pruning_ratio=s.max_per_layer, ignored_layers=ignored)
    base_count = tp.utils.count_ops_and_params(net, example[:1])[measured]
    count = base_count
    out: dict[float, tuple[nn.Module, dict[str, Any]]] = {}
    bar = tqdm(total=s.tp_iterative_steps, desc=f"torch-pruning {method} steps", leave=False,
               disable=not progress, dynamic_ncols=True)
    for factor in sorted(factors):
        while base_count / count < factor and pruner.current_step < pruner.iterative_steps:
            pruner.step()
            count = tp.utils.count_ops_and_params(net, example[:1])[measured]
            bar.update(1)
            bar.set_postfix(reduction=f"{base_count / count:.2f}x")
        snapshot = copy.deepcopy(net)
        snapshot.zero_grad(set_to_none=True)
        out[factor] = (snapshot, {"steps": pruner.current_step, f"tp_{'macs' if kind == 'flops' else kind}_reduction":
                                  base_count / count,
                                  "target_reached": base_count / count >= factor,
                                  "seconds": time.perf_counter() - t0})
    bar.close()
    return out


def dense_pruned_latency(dense: nn.Module, pruned: nn.Module, shape: tuple[int, ...], s: Settings
                         ) -> tuple[float, float]:
    """Median batch latency (ms) of dense and pruned, alternated ``s.latency_repeats`` times
    (``prunekit.measurement.latency.paired_latency``) after an untimed round of both (the first pruned row of a
    process measured up to 2x slow without it)."""
    runners = {name: forward_runner(net.eval(), shape, s.latency_batch) for name, net in
               (("dense", dense), ("pruned", pruned))}
    for run in runners.values():
        time_ms(run, min_run_time=s.latency_min_run_time)
    ms = paired_latency(runners, repeats=s.latency_repeats, min_run_time=s.latency_min_run_time)
    return ms["dense"], ms["pruned"]


def dense_summary(dense: nn.Module, data: DataSplits, s: Settings) -> dict[str, Any]:
    shape = (data.in_channels, data.input_size, data.input_size)
    return {"params": prunekit.count_params(dense), "flops": prunekit.count_flops(dense, (1, *shape)),
            "val_acc": prunekit.evaluate(dense, data.val)["acc"],
            "test_acc": prunekit.evaluate(dense, data.test)["acc"],
            "latency_ms": measure_latency(dense, shape, s.latency_batch, min_run_time=s.latency_min_run_time).median_ms,
            "latency_batch": s.latency_batch, "latency_threads": torch.get_num_threads(),
            "widths": layer_widths(dense)}


def finish_row(model_name: str, tool: str, method: str, factor: float, dense: nn.Module, net: nn.Module,
               data: DataSplits, s: Settings, dense_row: dict[str, Any], seconds_prune: float,
               tool_info: dict[str, Any], progress: bool, kind: str = "flops") -> dict[str, Any]:
    """Accuracy after pruning, identical fine-tuning, then size, FLOPs and paired latency; ``kind`` names what
    ``factor`` reduced (FLOPs or parameters)."""
    shape = (data.in_channels, data.input_size, data.input_size)
    val_pruned, test_pruned = prunekit.evaluate(net, data.val)["acc"], prunekit.evaluate(net, data.test)["acc"]
    t0 = time.perf_counter()
    torch.manual_seed(s.seed)
    result = prunekit.fit(net, data, s.finetune, progress=progress)
    seconds_finetune = time.perf_counter() - t0
    net.eval()
    params, flops = prunekit.count_params(net), prunekit.count_flops(net, (1, *shape))
    lat_dense, lat_pruned = dense_pruned_latency(dense, net, shape, s)
    speedup = lat_dense / lat_pruned
    reduction = dense_row["flops"] / flops
    return {
        "model": model_name, "tool": tool, "method": method, "factor": factor, "target": kind, "seed": s.seed,
        "params": params, "flops": flops, "dense_params": dense_row["params"], "dense_flops": dense_row["flops"],
        "flops_reduction": reduction, "params_reduction": dense_row["params"] / params,
        "latency_dense_ms": lat_dense, "latency_pruned_ms": lat_pruned, "latency_speedup": speedup,
        "speedup_per_flops_reduction": speedup / reduction, "latency_batch": s.latency_batch,
        "latency_threads": torch.get_num_threads(),
        "val_acc_pruned": val_pruned, "test_acc_pruned": test_pruned,
        "val_acc": result.best_val_acc, "test_acc": prunekit.evaluate(net, data.test)["acc"],
        "best_epoch": result.best_epoch, "dense_test_acc": dense_row["test_acc"], "seconds_prune": seconds_prune,
        "seconds_finetune": seconds_finetune, "tool_info": tool_info, "history": result.history,
    }


def warmup_text(finetune: dict[str, Any]) -> str:
    """How a row's fine-tuning warmed up, for the tables' descriptions ("" when it did not)."""
    warmup = finetune.get("warmup", 0.0)
    return f"linear warm-up over the first {warmup:.0%} of the steps, then " if warmup else ""


def fmt_acc(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def plot_accuracy_vs_flops(rows: list[dict[str, Any]], dense: dict[str, dict[str, Any]], path: Path) -> None:
    """Test accuracy against MFLOPs, one panel per model: prunekit rows solid, Torch-Pruning rows dashed."""
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
