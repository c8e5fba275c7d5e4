"""DPP (learned k-of-n masks) against magnitude k-of-n on the dense Fashion-MNIST LeNets, at 75%, 90% and 95%
sparsity, with float, 8-bit and binary weights.

Every row starts from the committed dense checkpoint and trains ``--epochs`` epochs (SGD lr ``--lr``, cosine, no
augmentation; test accuracy of the best-on-validation epoch):

* ``dpp``: masks and weights trained together (``prunekit.methods.dpp.dpp_prune_``, called directly because the
  layer plan below and the quantization of the layers it leaves dense are the benchmark's own; temperature 1 ->
  0.05 per epoch; by default logits start at 10 x the log-magnitude score, the Gumbel noise follows the temperature
  down and the logits learn at 5000 x the weights' lr, the best of the LeNet-5 pilots in ``results/dpp/pilot-*``);
* ``magnitude``: the same k-of-n pattern chosen by weight magnitude once, then masked retraining for the same
  epochs (:func:`magnitude_k_of_n_`).

Which layer keeps how many (``--layer-plan``, the same for both methods; the table reports the sparsity reached):

* ``small-dense`` (default): layers holding under 2% of the weights (LeNet-5's first convolution and classifier,
  LeNet-300's classifier) stay dense and the others share the budget at one keep ratio, each as the densest k-of-n
  at or under it with ``n <= 32`` dividing its rows (``prunekit.planning.allocation.plan_k_of_n``), the usual practice
  for N:M sparsity;
* ``uniform``: every layer keeps ``1`` of ``n`` (4, 10, 20), or the nearest run length dividing its rows
  (``prunekit.planning.allocation.nearest_k_of_n``: LeNet-300's 784-wide first layer, LeNet-5's 25-wide first conv).

Quantized rows (8-bit, binary) quantize every layer's weights by straight-through estimators in both methods'
training and keep the same sparsity pattern.

Filter granularity (``--filter-models``, default ResNet-20): DPP over coupled channel groups at 1/4 of the FLOPs
(``prunekit.prune_`` with ``prunekit.DPPConfig(pattern="group")``), the dropped filters removed physically, trained
for the two epochs (SGD lr 0.01, crop+flip) that the curvature benchmark's one-shot rows fine-tune for; the table
puts it next to those rows. Two recipes (``--filter-recipes``): the tuned one (magnitude start x10, Gumbel noise
``--filter-noise-scale`` annealed with the temperature, logits at the weights' lr) and the authors' one.

At 90% sparsity (``--authors-sparsities``) the k-of-n rows also run DPP with the authors' recipe (linear temperature
5 -> 0.5, logits from N(0, 1) trained by their own Adam, entropy regulariser ``--authors-entropy``).

    python benchmarks/dpp.py                        # LeNet-5 and LeNet-300-100, 75/90/95%, none/8-bit/binary
    python benchmarks/dpp.py --quick --out /tmp/q   # about a minute: digits, small LeNet-5, 75%, float

Every finished row is cached in ``<out>/cache``; an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

import prunekit
from common import (
    CHECKPOINT_DIR,
    LENETS,
    ROOT,
    RowCache,
    checkpoint_paths,
    prune_copy,
    quick_dense,
    sha256,
    write_json,
    write_text,
)
from prunekit.configs import plain
from prunekit.jobs import load_dense
from prunekit.measurement.plots import plot_mask_metrics
from prunekit.methods.dpp import dpp_prune_, ste_quantizer
from prunekit.planning.allocation import nearest_k_of_n, plan_k_of_n

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "dpp"
LEVELS = {0.75: (1, 4), 0.9: (1, 10), 0.95: (1, 20)}
LAYER_PLANS = ("small-dense", "uniform")
# DPP defaults chosen by the LeNet-5 90% pilots in results/dpp/pilot-* (README, "DPP"): a magnitude-informed start,
# noise annealed with the temperature, and a logit learning rate large enough for the masks to move in 6 epochs.
INIT_SCALE = 10.0
LOGIT_LR_SCALE = 5000.0
TEMPERATURE = prunekit.TemperatureSchedule(1.0, 0.05)  # per epoch, exponential


def _layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def tuned_recipe(args) -> dict[str, Any]:
    """The DPP settings the LeNet-5 pilots chose (``results/dpp/pilot-*``)."""
    return {"temperature": TEMPERATURE, "init_scale": args.init_scale, "noise_scale": args.noise_scale,
            "anneal_noise": args.anneal_noise, "logit_lr_scale": args.logit_lr_scale,
            "logit_optimizer": args.logit_optimizer, "entropy_weight": args.entropy_weight}


def authors_recipe(args) -> dict[str, Any]:
    """The authors' recipe (Gonzalez-Carabarin et al. 2021, arXiv 2105.12686): linear temperature 5 -> 0.5, random
    normal logits trained by their own Adam (at the weights' scheduled lr), the entropy regulariser."""
    return {"temperature": AUTHORS_TEMPERATURE, "logit_init": "normal", "init_scale": 1.0,
            "logit_optimizer": "adam", "logit_lr_scale": 1.0, "entropy_weight": args.authors_entropy}


def dpp_k_of_n_(net: nn.Module, data, per_layer: dict[str, tuple[int, int]], quant: str,
                train: prunekit.TrainConfig, args, recipe=tuned_recipe) -> dict[str, Any]:
    """DPP masks and weights trained together with the layer plan's k of n per layer (``dpp_prune_``: the plan
    and the quantization of the layers left dense are the benchmark's, not a config's); the layers left dense are
    quantized too."""
    k, n = next(iter(per_layer.values()))
    config = prunekit.DPPConfig(k=k, n=n, quant=quant, epochs=args.epochs, **recipe(args))
    configs = {name: replace(config, k=kk, n=nn_) for name, (kk, nn_) in per_layer.items()}
    dense_layers = [m for name, m in _layers(net).items() if name not in per_layer]
    quantize_(dense_layers, quant)  # dpp_prune_ quantizes the layers it masks
    result = dpp_prune_(net, data, config, train, layers=list(per_layer), progress=False, per_layer=configs)
    bake_(dense_layers)
    last = result.metrics[-1] if result.metrics else {}
    return {"final_confidence": {key: v for key, v in last.items() if key.endswith("/confidence")},
            "metrics": result.metrics}


def magnitude_k_of_n_(net: nn.Module, data, per_layer: dict[str, tuple[int, int]], quant: str,
                      train: prunekit.TrainConfig, args) -> dict[str, Any]:
    """The k largest magnitudes of every run, then masked retraining (every layer quantized by STE when asked)."""
    from torch.nn.utils import parametrize

    from prunekit.planning.constraints import SparsityConstraint, sparsity_mask
    from prunekit.training import TrainHooks

    layers = _layers(net)
    masks = {}
    with torch.no_grad():
        for name, (kk, nn_) in per_layer.items():
            masks[name] = sparsity_mask(layers[name].weight, SparsityConstraint(prunekit.Pattern.K_OF_N, k=kk, n=nn_))
            layers[name].weight.mul_(masks[name])
    quantize_(list(layers.values()), quant)

    def stored(m: nn.Module) -> torch.Tensor:
        return m.parametrizations.weight.original if parametrize.is_parametrized(m) else m.weight

    class KeepMasks(TrainHooks):
        @torch.no_grad()
        def after_step(self, model, optimizer, step):
            for name, mask in masks.items():
                stored(layers[name]).mul_(mask)
                state = optimizer.state.get(stored(layers[name]), {})
                if state.get("momentum_buffer") is not None:
                    state["momentum_buffer"].mul_(mask)

    prunekit.fit(net, data, train, progress=False, hooks=KeepMasks())
    bake_(list(layers.values()))
    return {}


def dpp_authors_k_of_n_(net: nn.Module, data, per_layer: dict[str, tuple[int, int]], quant: str,
                        train: prunekit.TrainConfig, args) -> dict[str, Any]:
    return dpp_k_of_n_(net, data, per_layer, quant, train, args, authors_recipe)


ROW_METHODS = {"magnitude": magnitude_k_of_n_, "dpp": dpp_k_of_n_, "dpp-authors": dpp_authors_k_of_n_}
TUNED_ROW = "dpp"  # the row whose mask metrics are plotted
AUTHORS_TEMPERATURE = prunekit.TemperatureSchedule(5.0, 0.5, "linear")


def run_row(dense, data, method: str, sparsity: float, quant: str, args) -> dict[str, Any]:
    torch.manual_seed(0)
    net = copy.deepcopy(dense).train()
    per_layer = layer_plan(net, sparsity, args.layer_plan)
    train = prunekit.TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=128, augment=prunekit.Augment.NONE,
                                 seed=0)
    extra = ROW_METHODS[method](net, data, per_layer, quant, train, args)
    net.eval()
    weights = [m.weight for m in _layers(net).values()]
    kept = sum(int((w != 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    return {"method": method, "sparsity_target": sparsity, "k_of_n": per_layer, "quant": quant,
            "sparsity": 1 - kept, "val_acc": prunekit.evaluate(net, data.val)["acc"],
            "test_acc": prunekit.evaluate(net, data.test)["acc"], **extra}


def layer_plan(net: nn.Module, sparsity: float, plan: str) -> dict[str, tuple[int, int]]:
    """``{layer: (k, n)}`` of the constrained layers under ``--layer-plan`` (layers left out stay dense)."""
    if plan == "uniform":
        k, n = LEVELS[sparsity]
        return {name: nearest_k_of_n(m.weight[0].numel(), k, n) for name, m in _layers(net).items()}
    return plan_k_of_n({name: m.weight.shape for name, m in _layers(net).items()}, sparsity)


def quantize_(layers: list[nn.Module], quant: str) -> None:
    """Train ``layers``' weights quantized (straight-through) under ``quant``; :func:`bake_` undoes it."""
    from torch.nn.utils import parametrize

    for m in layers:
        quantizer = ste_quantizer(quant)
        if quantizer is not None:
            parametrize.register_parametrization(m, "weight", quantizer)


def bake_(layers: list[nn.Module]) -> None:
    """Leave the (quantized) weights as plain parameters."""
    from torch.nn.utils import parametrize

    for m in layers:
        if parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)


FILTER_MODELS = ("resnet20",)
FILTER_NOISE_SCALE = 0.03  # the tuned filter recipe's Gumbel noise (results/dpp/pilot-filter-*)
FILTER_FLOPS = 0.25


def filter_row(checkpoint: Path, epochs: int, augment: prunekit.Augment, recipe: dict[str, Any]) -> dict[str, Any]:
    """DPP's group pattern (``prunekit.prune_`` with ``prunekit.DPPConfig(pattern="group", **recipe)``): filters of
    coupled groups from the dense checkpoint, the dropped ones removed physically. The tuned recipe's logits learn
    at the weights' lr: a filter mask's gradient already sums over a whole channel."""
    from prunekit.channels.graph import ChannelGraph
    from prunekit.persistence.architecture import input_shape_of

    dense, base, data_cfg = load_dense(None, checkpoint, None)
    data = prunekit.load_dataset(data_cfg)
    shape = (1, *input_shape_of(base))
    config = prunekit.DPPConfig(pattern="group", target=prunekit.Target("flops", FILTER_FLOPS), epochs=epochs,
                                **recipe)
    train = prunekit.TrainConfig(epochs=epochs, lr=0.01, batch_size=128, augment=augment, seed=0)
    net, record = prune_copy(dense, config, data, train=train)
    net.eval()
    sizes = {g.root: g.size for g in ChannelGraph(copy.deepcopy(dense), data.train[:2][0]).groups}
    metrics = record.results["metrics"]
    last = metrics[-1] if metrics else {}
    return {"flops_reduction": prunekit.count_flops(dense, shape) / prunekit.count_flops(net, shape),
            "params_reduction": prunekit.count_params(dense) / prunekit.count_params(net),
            "kept": {root: [sizes[root] - len(removed), sizes[root]]
                     for root, removed in record.changes[0]["removed"].items()},
            "dense_test_acc": prunekit.evaluate(dense, data.test)["acc"],
            "val_acc": prunekit.evaluate(net, data.val)["acc"], "test_acc": prunekit.evaluate(net, data.test)["acc"],
            "metrics": metrics, "final_confidence": {k: v for k, v in last.items() if k.endswith("/confidence")}}


FILTER_RECIPES = {"tuned": "DPP filter (coupled groups)", "authors": "DPP filter, the authors' recipe"}


# The curvature benchmark's one-shot x4 rows as they were measured with DPP's own fine-tuning recipe (lr 0.01, no
# warm-up, two epochs; by the command and commit recorded in the file), kept as DPP's reference after that
# benchmark moved to prunekit's fine-tuning default with warm-up.
CURVATURE_REFERENCE = ROOT / "benchmarks" / "results" / "dpp" / "curvature_reference.json"


def filter_table(model: str, rows: dict[str, dict[str, Any]], reference: Path) -> str:
    """``rows``: recipe name -> that recipe's filter row."""
    row = next(iter(rows.values()))
    lines = [f"**{model}, filter granularity at 1/{1 / FILTER_FLOPS:g} of the FLOPs** (dense test accuracy "
             f"{100 * row['dense_test_acc']:.2f}%)", "",
             "| method | FLOPs red. | params red. | test acc % | source |", "|---|---|---|---|---|"]
    lines += [f"| {FILTER_RECIPES[name]} | {r['flops_reduction']:.2f}x | {r['params_reduction']:.2f}x | "
              f"{100 * r['test_acc']:.2f} | this run |" for name, r in rows.items()]
    if reference.is_file():  # the curvature benchmark's one-shot rows: same checkpoint, same two epochs
        for r in json.loads(reference.read_text()).get("rows", []):
            if r.get("model") == model and r.get("schedule") == "one-shot" and r.get("target", "flops") == "flops" \
                    and abs(r.get("flops_reduction", 0) - 1 / FILTER_FLOPS) < 0.2:
                lines.append(f"| {r['tool']} {r['method']} | {r['flops_reduction']:.2f}x | "
                             f"{r['params_reduction']:.2f}x | {100 * r['test_acc']:.2f} | "
                             f"`{reference.relative_to(ROOT)}` |")
    return "\n".join(lines)


def _pairs(rows: list[dict[str, Any]]):
    """``(sparsity target, quant, magnitude row, DPP row, authors'-recipe DPP row)`` in run order (``None`` where
    a row was not run)."""
    by: dict[str, dict[tuple[float, str], dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["method"], {})[(r["sparsity_target"], r["quant"])] = r
    for (s, q), r in by.get("dpp", {}).items():
        yield s, q, by.get("magnitude", {}).get((s, q)), r, by.get("dpp-authors", {}).get((s, q))


def _cells(mag: dict[str, Any] | None, dpp: dict[str, Any], authors: dict[str, Any] | None) -> str:
    def acc(r):
        return "-" if r is None else f"{100 * r['test_acc']:.2f}"

    def diff(r):
        return "-" if mag is None or r is None else f"{100 * (r['test_acc'] - mag['test_acc']):+.2f}"

    return f"{acc(mag)} | {acc(dpp)} | {diff(dpp)} | {acc(authors)} | {diff(authors)} | {dpp['sparsity']:.3f}"


HEAD = ("magnitude k-of-n % | DPP tuned % | tuned - magnitude pt | DPP authors' recipe % | authors - magnitude pt | "
        "sparsity reached")


def table(model: str, dense_acc: float, rows: list[dict[str, Any]]) -> str:
    lines = [f"**{model}** (dense test accuracy {100 * dense_acc:.2f}%)", "",
             f"| sparsity target | weights | {HEAD} |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {s:.0%} | {q} | {_cells(mag, r, a)} |" for s, q, mag, r, a in _pairs(rows)]
    return "\n".join(lines)


def readme_table(payload: dict[str, Any]) -> str:
    """Both LeNets in one table, with each row's k of n per layer (the README's DPP table)."""
    lines = [f"| model (dense %) | sparsity target | weights | k of n per layer | {HEAD} |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for model, entry in payload["models"].items():
        for s, q, mag, r, a in _pairs(entry["rows"]):
            plan = ", ".join(f"{name} {k}/{n}" for name, (k, n) in r["k_of_n"].items())
            lines.append(f"| {model} ({100 * entry['dense_test_acc']:.2f}) | {s:.0%} | {q} | {plan} | "
                         f"{_cells(mag, r, a)} |")
    return "\n".join(lines)


def readme_filter_table(payload: dict[str, Any]) -> str:
    return "\n\n".join(filter_table(model, rows, CURVATURE_REFERENCE)
                        for model, rows in payload.get("filter", {}).items())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dpp.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="*", default=None, choices=sorted(LENETS),
                   help="models of the k-of-n rows (default: both LeNets; none: skip)")
    p.add_argument("--sparsities", nargs="+", type=float, default=None, help=f"of {sorted(LEVELS)}")
    p.add_argument("--quant", nargs="+", default=None, help="none, bits=8, binary (default: all three)")
    p.add_argument("--quant-sparsities", nargs="+", type=float, default=[0.9],
                   help="sparsities that also get the quantized rows (default 0.9, the goal's level)")
    p.add_argument("--filter-models", nargs="*", default=None, choices=sorted(FILTER_MODELS),
                   help="models of the filter-granularity row (default resnet20; none: skip)")
    p.add_argument("--filter-epochs", type=int, default=2)
    p.add_argument("--filter-noise-scale", type=float, default=FILTER_NOISE_SCALE,
                   help=f"Gumbel noise scale of the tuned filter recipe (default {FILTER_NOISE_SCALE:g}, the best "
                        "ResNet-20 pilot)")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--layer-plan", choices=LAYER_PLANS, default="small-dense",
                   help="small-dense: layers under 2%% of the weights stay dense, the rest share the budget; "
                        "uniform: 1 of n everywhere (default small-dense)")
    p.add_argument("--init-scale", type=float, default=INIT_SCALE,
                   help="DPP logits start at this times the log of the normalised weight magnitudes "
                        f"(default {INIT_SCALE:g})")
    p.add_argument("--noise-scale", type=float, default=1.0, help="DPP Gumbel noise scale of the k-of-n rows")
    p.add_argument("--anneal-noise", action=argparse.BooleanOptionalAction, default=True,
                   help="DPP noise scale follows the temperature down (DPPConfig.anneal_noise; default on)")
    p.add_argument("--logit-lr-scale", type=float, default=LOGIT_LR_SCALE,
                   help=f"DPP logits' learning rate as a multiple of --lr (default {LOGIT_LR_SCALE:g})")
    p.add_argument("--logit-optimizer", choices=["sgd", "adam"], default="sgd",
                   help="how the tuned recipe's logits learn (default sgd, at --logit-lr-scale x lr)")
    p.add_argument("--entropy-weight", type=float, default=0.0, help="the tuned recipe's entropy regulariser")
    p.add_argument("--authors-sparsities", nargs="*", type=float, default=[0.9],
                   help="sparsities that also get the authors'-recipe DPP rows (default 0.9)")
    p.add_argument("--authors-entropy", type=float, default=0.01,
                   help="entropy regulariser weight of the authors' recipe (default 0.01)")
    p.add_argument("--filter-recipes", nargs="+", default=["tuned", "authors"], choices=sorted(FILTER_RECIPES))
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--checkpoint-dir", type=Path, default=CHECKPOINT_DIR)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.models = ["lenet5"] if args.models is None else args.models
        args.sparsities = args.sparsities or [0.75]
        args.quant, args.epochs = args.quant or ["none"], 1
        args.quant_sparsities = args.authors_sparsities = [0.75]
        torch.set_num_threads(1)
    args.filter_models = ["resnet20"] if args.filter_models is None else args.filter_models
    args.models = ["lenet5", "lenet300"] if args.models is None else args.models
    args.sparsities = args.sparsities or sorted(LEVELS)
    args.quant = args.quant or ["none", "bits=8", "binary"]
    if not args.logit_lr_scale > 0:
        p.error(f"--logit-lr-scale must be > 0, got {args.logit_lr_scale}")
    if args.init_scale < 0 or args.noise_scale < 0 or args.filter_noise_scale < 0:
        p.error(f"--init-scale, --noise-scale and --filter-noise-scale must be >= 0, got {args.init_scale}, "
                f"{args.noise_scale} and {args.filter_noise_scale}")
    bad = [s for s in args.sparsities if s not in LEVELS]
    if bad:
        p.error(f"--sparsities must be among {sorted(LEVELS)}, got {bad}")
    if any(q not in ("none", "binary") and not (q.startswith("bits=") and q[5:].isdigit()) for q in args.quant):
        p.error(f"--quant takes none, binary or bits=N, got {args.quant}")
    command = shlex.join(["python", "benchmarks/dpp.py", *(sys.argv[1:] if argv is None else argv)])
    cache = RowCache(args.out / "cache")
    payload: dict[str, Any] = {"command": command, "models": {}}
    texts = []
    for model_name in args.models:
        checkpoint = quick_dense(cache.directory, "lenet5") if args.quick else \
            checkpoint_paths([model_name], args.checkpoint_dir, LENETS)[model_name]
        dense, _, data_cfg = load_dense(None, checkpoint, None)
        data = prunekit.load_dataset(data_cfg)
        dense_acc = prunekit.evaluate(dense, data.test)["acc"]
        settings = {"checkpoint_sha256": sha256(checkpoint), "epochs": args.epochs, "lr": args.lr,
                    **({"layer_plan": args.layer_plan} if args.layer_plan != "uniform" else {})}
        row_settings = {"magnitude": settings, "dpp": {
            **settings, "init_scale": args.init_scale, "noise_scale": args.noise_scale,
            "anneal_noise": args.anneal_noise, "logit_lr_scale": args.logit_lr_scale,
            **({"logit_optimizer": args.logit_optimizer} if args.logit_optimizer != "sgd" else {}),
            **({"entropy_weight": args.entropy_weight} if args.entropy_weight else {})},
            "dpp-authors": {**settings, "recipe": plain(authors_recipe(args))}}
        rows = []
        for q in args.quant:
            for s in args.sparsities:
                if q != "none" and s not in args.quant_sparsities:
                    continue
                for method in ROW_METHODS:
                    if method == "dpp-authors" and s not in args.authors_sparsities:
                        continue
                    # quantized DPP rows since the quantizer acts on the masked weights (issue 16)
                    fixed = {"quantizer": "after-mask"} if q != "none" and method != "magnitude" else {}
                    rows.append(cache.get_or_run(
                        f"{model_name}__{method}__s{s:g}__{q.replace('=', '')}",
                        {**row_settings[method], **fixed}, run_row, dense, data,
                        method, s, q, args, announce=f"{model_name} {method} {s:.0%} {q}: test acc "
                                                     "{test_acc:.4f} (sparsity {sparsity:.3f})"))
        payload["models"][model_name] = {"dense_test_acc": dense_acc, "rows": rows}
        texts.append(table(model_name, dense_acc, rows))
        for r in rows:  # how the masks settled: the float DPP row (the one with mask metrics) at the goal's sparsity
            if r["method"] == TUNED_ROW and r["quant"] == "none" and \
                    r["sparsity_target"] == max(s for s in args.sparsities if s <= 0.9):
                name = f"{model_name}_mask_metrics.png"
                args.out.mkdir(parents=True, exist_ok=True)
                plot_mask_metrics(r["metrics"], args.out / name,
                                  f"DPP {model_name}, {r['sparsity_target']:.0%} k-of-n: per-layer masks")
                texts.append(f"![mask confidence and diversity]({name})\n")
    args.out.mkdir(parents=True, exist_ok=True)
    filter_jobs = [("lenet5", quick_dense(cache.directory, "lenet5"), 1, prunekit.Augment.NONE)] if args.quick else \
        [(m, path, args.filter_epochs, prunekit.Augment.CROP_FLIP)
         for m, path in checkpoint_paths(args.filter_models, args.checkpoint_dir, FILTER_MODELS).items()]
    for model_name, checkpoint, epochs, augment in filter_jobs:
        base = {"checkpoint_sha256": sha256(checkpoint), "epochs": epochs, "augment": augment.value}
        noise = {"noise_scale": args.filter_noise_scale} if args.filter_noise_scale != 1.0 else {}
        recipes = {"tuned": ({"temperature": TEMPERATURE, "init_scale": args.init_scale,
                              "anneal_noise": args.anneal_noise, **noise},
                             {"init_scale": args.init_scale, "anneal_noise": args.anneal_noise, **noise}),
                   "authors": (authors_recipe(args), {"recipe": plain(authors_recipe(args))})}
        rows = {}
        for name in args.filter_recipes:
            recipe, settings = recipes[name]
            key = f"{model_name}__filter__flops{FILTER_FLOPS:g}" + ("" if name == "tuned" else f"__{name}")
            rows[name] = cache.get_or_run(key, {**base, **settings}, filter_row, checkpoint, epochs, augment, recipe,
                                          announce=f"{model_name} DPP filter ({name}): test acc {{test_acc:.4f}} "
                                                   "(FLOPs {flops_reduction:.2f}x)")
        payload.setdefault("filter", {})[model_name] = rows
        texts.append(filter_table(model_name, rows, CURVATURE_REFERENCE))
    write_json(args.out / "dpp.json", payload)
    md = ["# DPP vs magnitude k-of-n" + (" (quick smoke run)" if args.quick else ""), "",
          "Made by (from the repository root):", "", f"    {command}", "",
          f"{args.epochs} training epoch(s) per row for both methods, SGD lr {args.lr}, cosine, no augmentation; "
          f"layer plan {args.layer_plan} (k of n per layer in `dpp.json`); "
          f"DPP logits start at {args.init_scale:g} x log(1 + |w| / mean|w|), Gumbel noise scale "
          f"{args.noise_scale:g}{' annealed with the temperature' if args.anneal_noise else ''}, logit lr "
          f"{args.logit_lr_scale:g} x lr ({args.logit_optimizer}"
          f"{f', entropy weight {args.entropy_weight:g}' if args.entropy_weight else ''}); the filter rows' tuned "
          f"recipe: noise scale {args.filter_noise_scale:g}, logit lr 1 x lr. "
          "The authors' recipe: temperature 5 -> 0.5 linear, logits from N(0, 1) "
          f"trained by their own Adam at the weights' scheduled lr, entropy weight {args.authors_entropy:g}. Both "
          "start from the dense weights (from scratch was not run: the budget went to the rows above). Quantized "
          "DPP rows quantize the masked weights. Test accuracy of the best-on-validation epoch.", ""] + \
        [t + "\n" for t in texts]
    write_text(args.out / "dpp.md", "\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
