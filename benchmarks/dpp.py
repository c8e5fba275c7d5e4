"""DPP (learned k-of-n masks) against magnitude k-of-n on the dense Fashion-MNIST LeNets, at 75%, 90% and 95%
sparsity, with float, 8-bit and binary weights.

Every row starts from the committed dense checkpoint and trains ``--epochs`` epochs (SGD lr ``--lr``, cosine, no
augmentation; test accuracy of the best-on-validation epoch):

* ``dpp``: masks and weights trained together (``prunekit.dpp.dpp_prune_``, temperature 1 -> 0.05 per epoch);
* ``magnitude``: the same k-of-n pattern chosen by weight magnitude once, then masked retraining for the same
  epochs (``prunekit.admm`` with no ADMM epochs).

A sparsity ``1 - k/n`` is requested as ``k`` of ``n``; where ``n`` does not divide a layer's rows (LeNet-300's
784-wide first layer, LeNet-5's 25-wide first conv) that layer gets the nearest dividing run length
(``prunekit.dpp.nearest_k_of_n``), and the table reports the sparsity actually reached. Quantized rows (8-bit,
binary) use straight-through estimators for both methods' training and report the same sparsity pattern.

Filter granularity (``--filter-models``, default ResNet-20): DPP over coupled channel groups at 1/4 of the FLOPs
(``prunekit.dpp_groups``), the dropped filters removed physically, trained for the two epochs (SGD lr 0.01,
crop+flip) that the curvature benchmark's one-shot rows fine-tune for; the table puts it next to those rows.

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
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.checkpoint import atomic_write
from prunekit.data import load_dataset
from prunekit.dpp import DPPConfig, TemperatureSchedule, dpp_prune_, nearest_k_of_n
from prunekit.jobs import load_dense
from prunekit.plots import plot_mask_metrics
from prunekit.training import Augment, TrainConfig, evaluate

sys.path.insert(0, str(Path(__file__).resolve().parent))
import admm as admm_bench  # noqa: E402  (the quick dense LeNet-5 and the checkpoint names)
import structured as st  # noqa: E402  (row cache and hashing)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "dpp"
LEVELS = {0.75: (1, 4), 0.9: (1, 10), 0.95: (1, 20)}


def _layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def run_row(dense, data, method: str, sparsity: float, quant: str, args) -> dict[str, Any]:
    torch.manual_seed(0)
    net = copy.deepcopy(dense).train()
    k, n = LEVELS[sparsity]
    per_layer = {name: nearest_k_of_n(m.weight[0].numel(), k, n) for name, m in _layers(net).items()}
    train = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=128, augment=Augment.NONE, seed=0)
    extra: dict[str, Any] = {}
    if method == "dpp":
        schedule = TemperatureSchedule(1.0, 0.05, max(args.epochs, 1))
        extra_config = {"init_scale": args.init_scale, "noise_scale": args.noise_scale,
                        "anneal_noise": args.anneal_noise, "logit_lr_scale": args.logit_lr_scale}
        configs = {name: DPPConfig(k=kk, n=nn_, temperature=schedule, **extra_config)
                   for name, (kk, nn_) in per_layer.items()}
        result = dpp_prune_(net, data, DPPConfig(k=k, n=n, temperature=schedule, **extra_config), train,
                            layers=list(per_layer),
                            quant=quant, progress=False, per_layer=configs)
        last = result.metrics[-1] if result.metrics else {}
        extra["final_confidence"] = {key: v for key, v in last.items() if key.endswith("/confidence")}
        extra["metrics"] = result.metrics
    else:
        magnitude_k_of_n_(net, data, per_layer, quant, train)
    net.eval()
    weights = [m.weight for m in _layers(net).values()]
    kept = sum(int((w != 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    return {"method": method, "sparsity_target": sparsity, "k_of_n": per_layer, "quant": quant,
            "sparsity": 1 - kept, "val_acc": evaluate(net, data.val)["acc"],
            "test_acc": evaluate(net, data.test)["acc"], **extra}


def magnitude_k_of_n_(net: nn.Module, data, per_layer: dict[str, tuple[int, int]], quant: str,
                      train: TrainConfig) -> None:
    """The k largest magnitudes of every run, then masked retraining (quantized by STE when asked)."""
    from torch.nn.utils import parametrize

    from prunekit.constraints import Pattern, SparsityConstraint, sparsity_mask
    from prunekit.dpp import STEQuantize
    from prunekit.training import TrainHooks, fit

    layers = _layers(net)
    masks = {}
    with torch.no_grad():
        for name, (kk, nn_) in per_layer.items():
            masks[name] = sparsity_mask(layers[name].weight, SparsityConstraint(Pattern.K_OF_N, k=kk, n=nn_))
            layers[name].weight.mul_(masks[name])
    if quant != "none":
        for m in layers.values():
            parametrize.register_parametrization(
                m, "weight", STEQuantize(binary=True) if quant == "binary" else STEQuantize(bits=int(quant[5:])))

    def stored(m: nn.Module) -> torch.Tensor:
        return m.parametrizations.weight.original if parametrize.is_parametrized(m) else m.weight

    class KeepMasks(TrainHooks):
        @torch.no_grad()
        def after_step(self, model, optimizer, step):
            for name, m in layers.items():
                stored(m).mul_(masks[name])
                state = optimizer.state.get(stored(m), {})
                if state.get("momentum_buffer") is not None:
                    state["momentum_buffer"].mul_(masks[name])

    fit(net, data, train, progress=False, hooks=KeepMasks())
    if quant != "none":
        for m in layers.values():
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)


FILTER_CHECKPOINTS = {"resnet20": "resnet20-fmnist.safetensors"}
FILTER_FLOPS = 0.25


def filter_row(checkpoint: Path, epochs: int, augment: Augment) -> dict[str, Any]:
    """Filter-granularity DPP on coupled groups from the dense checkpoint; the network shrinks physically."""
    from prunekit.allocation import Target
    from prunekit.architecture import input_shape_of
    from prunekit.dpp_groups import dpp_filter_prune_
    from prunekit.metrics import count_flops, count_params

    dense, base, data_cfg = load_dense(None, checkpoint, None)
    data = load_dataset(data_cfg)
    shape = (1, *input_shape_of(base))
    torch.manual_seed(0)
    net = copy.deepcopy(dense).train()
    config = DPPConfig(k=1, n=2, temperature=TemperatureSchedule(1.0, 0.05, max(epochs, 1)))
    train = TrainConfig(epochs=epochs, lr=0.01, batch_size=128, augment=augment, seed=0)
    result = dpp_filter_prune_(net, data, Target("flops", FILTER_FLOPS), config, train, progress=False)
    net.eval()
    last = result.metrics[-1] if result.metrics else {}
    return {"flops_reduction": count_flops(dense, shape) / count_flops(net, shape),
            "params_reduction": count_params(dense) / count_params(net), "kept": result.kept,
            "dense_test_acc": evaluate(dense, data.test)["acc"], "val_acc": evaluate(net, data.val)["acc"],
            "test_acc": evaluate(net, data.test)["acc"], "metrics": result.metrics,
            "final_confidence": {k: v for k, v in last.items() if k.endswith("/confidence")}}


def filter_table(model: str, row: dict[str, Any], reference: Path) -> str:
    lines = [f"**{model}, filter granularity at 1/{1 / FILTER_FLOPS:g} of the FLOPs** (dense test accuracy "
             f"{100 * row['dense_test_acc']:.2f}%)", "",
             "| method | FLOPs red. | params red. | test acc % | source |", "|---|---|---|---|---|",
             f"| DPP filter (coupled groups) | {row['flops_reduction']:.2f}x | {row['params_reduction']:.2f}x | "
             f"{100 * row['test_acc']:.2f} | this run |"]
    if reference.is_file():  # the curvature benchmark's one-shot rows: same checkpoint, same two epochs
        for r in json.loads(reference.read_text()).get("rows", []):
            if r.get("model") == model and r.get("schedule") == "one-shot" and \
                    abs(r.get("flops_reduction", 0) - 1 / FILTER_FLOPS) < 0.2:
                lines.append(f"| {r['tool']} {r['method']} | {r['flops_reduction']:.2f}x | "
                             f"{r['params_reduction']:.2f}x | {100 * r['test_acc']:.2f} | "
                             f"`{reference.relative_to(ROOT)}` |")
    return "\n".join(lines)


def table(model: str, dense_acc: float, rows: list[dict[str, Any]]) -> str:
    lines = [f"**{model}** (dense test accuracy {100 * dense_acc:.2f}%)", "",
             "| sparsity target | weights | magnitude k-of-n test acc % | DPP test acc % | DPP - magnitude pt | "
             "sparsity reached |", "|---|---|---|---|---|---|"]
    by = {(r["method"], r["sparsity_target"], r["quant"]): r for r in rows}
    for (method, s, q), r in by.items():
        if method != "dpp":
            continue
        mag = by.get(("magnitude", s, q))
        diff = "-" if mag is None else f"{100 * (r['test_acc'] - mag['test_acc']):+.2f}"
        mag_acc = "-" if mag is None else f"{100 * mag['test_acc']:.2f}"
        lines.append(f"| {s:.0%} | {q} | {mag_acc} | "
                     f"{100 * r['test_acc']:.2f} | {diff} | {r['sparsity']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dpp.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=None, choices=sorted(admm_bench.CHECKPOINTS))
    p.add_argument("--sparsities", nargs="+", type=float, default=None, help=f"of {sorted(LEVELS)}")
    p.add_argument("--quant", nargs="+", default=None, help="none, bits=8, binary (default: all three)")
    p.add_argument("--quant-sparsities", nargs="+", type=float, default=[0.9],
                   help="sparsities that also get the quantized rows (default 0.9, the goal's level)")
    p.add_argument("--filter-models", nargs="*", default=None, choices=sorted(FILTER_CHECKPOINTS),
                   help="models of the filter-granularity row (default resnet20; none: skip)")
    p.add_argument("--filter-epochs", type=int, default=2)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--init-scale", type=float, default=1.0,
                   help="DPP logits start at this times the log of the normalised weight magnitudes")
    p.add_argument("--noise-scale", type=float, default=1.0, help="DPP Gumbel noise scale")
    p.add_argument("--anneal-noise", action="store_true",
                   help="DPP noise scale follows the temperature down (DPPConfig.anneal_noise)")
    p.add_argument("--logit-lr-scale", type=float, default=1.0,
                   help="DPP logits' learning rate as a multiple of --lr")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--checkpoint-dir", type=Path, default=st.CHECKPOINT_DIR)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.sparsities = args.models or ["lenet5"], args.sparsities or [0.75]
        args.quant, args.epochs = args.quant or ["none"], 1
        args.quant_sparsities = [0.75]
        torch.set_num_threads(1)
    args.filter_models = ["resnet20"] if args.filter_models is None else args.filter_models
    args.models = args.models or ["lenet5", "lenet300"]
    args.sparsities = args.sparsities or sorted(LEVELS)
    args.quant = args.quant or ["none", "bits=8", "binary"]
    if not args.logit_lr_scale > 0:
        p.error(f"--logit-lr-scale must be > 0, got {args.logit_lr_scale}")
    if args.init_scale < 0 or args.noise_scale < 0:
        p.error(f"--init-scale and --noise-scale must be >= 0, got {args.init_scale} and {args.noise_scale}")
    bad = [s for s in args.sparsities if s not in LEVELS]
    if bad:
        p.error(f"--sparsities must be among {sorted(LEVELS)}, got {bad}")
    if any(q not in ("none", "binary") and not (q.startswith("bits=") and q[5:].isdigit()) for q in args.quant):
        p.error(f"--quant takes none, binary or bits=N, got {args.quant}")
    command = shlex.join(["python", "benchmarks/dpp.py", *(sys.argv[1:] if argv is None else argv)])
    cache = st.RowCache(args.out / "cache")
    payload: dict[str, Any] = {"command": command, "models": {}}
    texts = []
    for model_name in args.models:
        checkpoint = admm_bench.quick_dense(cache.directory) if args.quick else \
            args.checkpoint_dir / admm_bench.CHECKPOINTS[model_name]
        if not checkpoint.is_file():
            raise SystemExit(f"dpp.py: error: {checkpoint} is missing; train it with "
                             f"`bash benchmarks/checkpoints/train_baselines.sh {model_name}`")
        dense, _, data_cfg = load_dense(None, checkpoint, None)
        data = load_dataset(data_cfg)
        dense_acc = evaluate(dense, data.test)["acc"]
        settings = {"checkpoint_sha256": st._sha256(checkpoint), "epochs": args.epochs, "lr": args.lr}
        dpp_settings = {**settings, **({"init_scale": args.init_scale, "noise_scale": args.noise_scale}
                                       if (args.init_scale, args.noise_scale) != (1.0, 1.0) else {}),
                        **({"anneal_noise": True} if args.anneal_noise else {}),
                        **({"logit_lr_scale": args.logit_lr_scale} if args.logit_lr_scale != 1.0 else {})}
        rows = []
        for q in args.quant:
            for s in args.sparsities:
                if q != "none" and s not in args.quant_sparsities:
                    continue
                for method in ("magnitude", "dpp"):
                    rows.append(cache.get_or_run(
                        f"{model_name}__{method}__s{s:g}__{q.replace('=', '')}",
                        dpp_settings if method == "dpp" else settings, run_row, dense, data,
                        method, s, q, args, announce=f"{model_name} {method} {s:.0%} {q}: test acc "
                                                     "{test_acc:.4f} (sparsity {sparsity:.3f})"))
        payload["models"][model_name] = {"dense_test_acc": dense_acc, "rows": rows}
        texts.append(table(model_name, dense_acc, rows))
        for r in rows:  # how the masks settled: the float DPP row at the goal's sparsity
            if r["method"] == "dpp" and r["quant"] == "none" and r.get("metrics") and \
                    r["sparsity_target"] == max(s for s in args.sparsities if s <= 0.9):
                name = f"{model_name}_mask_metrics.png"
                args.out.mkdir(parents=True, exist_ok=True)
                plot_mask_metrics(r["metrics"], args.out / name,
                                  f"DPP {model_name}, {r['sparsity_target']:.0%} k-of-n: per-layer masks")
                texts.append(f"![mask confidence and diversity]({name})\n")
    args.out.mkdir(parents=True, exist_ok=True)
    filter_jobs = [("lenet5", admm_bench.quick_dense(cache.directory), 1, Augment.NONE)] if args.quick else \
        [(m, args.checkpoint_dir / FILTER_CHECKPOINTS[m], args.filter_epochs, Augment.CROP_FLIP)
         for m in args.filter_models]
    for model_name, checkpoint, epochs, augment in filter_jobs:
        key, settings = f"{model_name}__filter__flops{FILTER_FLOPS:g}", {
            "checkpoint_sha256": st._sha256(checkpoint), "epochs": epochs, "augment": augment.value}
        row = cache.get_or_run(key, settings, filter_row, checkpoint, epochs, augment,
                               announce=f"{model_name} DPP filter: test acc {{test_acc:.4f}} "
                                        "(FLOPs {flops_reduction:.2f}x)")
        payload.setdefault("filter", {})[model_name] = row
        texts.append(filter_table(model_name, row, ROOT / "benchmarks/results/eigendamage/eigendamage.json"))
    atomic_write(args.out / "dpp.json", lambda tmp: Path(tmp).write_text(json.dumps(payload, indent=1)))
    md = ["# DPP vs magnitude k-of-n" + (" (quick smoke run)" if args.quick else ""), "",
          "Made by (from the repository root):", "", f"    {command}", "",
          f"{args.epochs} training epoch(s) per row for both methods, SGD lr {args.lr}, cosine, no augmentation; "
          f"DPP logits start at {args.init_scale:g} x log(1 + |w| / mean|w|), Gumbel noise scale "
          f"{args.noise_scale:g}{' annealed with the temperature' if args.anneal_noise else ''}, logit lr "
          f"{args.logit_lr_scale:g} x lr; test accuracy of the best-on-validation epoch.", ""] + \
        [t + "\n" for t in texts]
    atomic_write(args.out / "dpp.md", lambda tmp: Path(tmp).write_text("\n".join(md)))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
