"""ADMM-NN-S on the dense Fashion-MNIST LeNets: how far non-structured pruning goes within 1 point of accuracy, and
what joint quantization does to the storage once indices and scales are counted.

For LeNet-5 and LeNet-300-100 (committed checkpoints), every row starts from the dense weights:

* ``admm``: unstructured ADMM pruning (``--admm-epochs``) keeping 1/rate of the weights (global magnitude
  allocation over all layers, the classifier included), then masked retraining (``--retrain-epochs``);
* ``imp``: iterative magnitude pruning with the same number of epochs (``--imp-steps`` steps, each a global
  magnitude prune to the next rate followed by masked retraining);
* at the highest ADMM rate within ``--max-loss`` points of the dense test accuracy: the same ADMM run followed by
  joint quantization to 3 bits and to binary weights.

Then the structured vs non-structured verdict (``--verdict``, on by default) for LeNet-5 (10x fewer weights) and
ResNet-20 (4x fewer FLOPs): group ADMM (whole coupled channels, removed physically) at that target, unstructured
ADMM keeping the same number of weights, and ``prunekit compare`` of both against the dense network (accuracy,
storage, latency of dense and sparse kernels, break-even sparsity), written to ``<out>/verdict-<model>/``. ResNet-20
trains as the structural benchmarks fine-tune (SGD lr 0.01, crop+flip, 1 ADMM + 1 retraining epoch: the two epochs
the curvature benchmark's rows get).

Storage: exact bits of the best format (``prunekit.measurement.formats``: dense, CSR, relative indexing with 5-bit gaps,
bitmap), weights + indices + scales, every other parameter as float32; compression = dense float32 bits / that.
Accuracy: test accuracy of the best-on-validation retraining epoch.

    python benchmarks/admm.py                        # LeNet-5 and LeNet-300-100, rates 10 20 50 100
    python benchmarks/admm.py --quick --out /tmp/q   # about a minute: digits, small LeNet-5, one rate
    python benchmarks/admm.py --models --verdict lenet5 resnet20   # only the verdict (run it on an idle machine)

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

from prunekit.data import DataConfig, load_dataset
from prunekit.jobs import load_dense
from prunekit.methods.admm import ADMMConfig, admm_prune_, storage_report
from prunekit.models import ModelConfig, create_model
from prunekit.persistence.architecture import save_compressed
from prunekit.persistence.checkpoint import atomic_write, save_checkpoint
from prunekit.training import Augment, TrainConfig, evaluate, fit

sys.path.insert(0, str(Path(__file__).resolve().parent))
import structured as st  # noqa: E402  (the sibling benchmark: row cache, checkpoint lookup, hashing)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "admm"
CHECKPOINTS = {"lenet5": "lenet5-fmnist.safetensors", "lenet300": "lenet300-fmnist.safetensors"}
VERDICT_CHECKPOINTS = {"lenet5": "lenet5-fmnist.safetensors", "resnet20": "resnet20-fmnist.safetensors"}
VERDICT_TARGETS = {"lenet5": ("params", 0.1), "resnet20": ("flops", 0.25)}


def quick_dense(cache: Path) -> Path:
    path = cache / "quick-dense-lenet5.safetensors"
    if path.is_file():
        return path
    data = load_dataset(DataConfig(name="digits"))
    torch.manual_seed(0)
    config = ModelConfig("lenet5", num_classes=10, in_channels=1, input_size=8)
    net = create_model(config)
    fit(net, data, TrainConfig(epochs=8, lr=0.05, augment=Augment.CROP), progress=False)
    save_checkpoint(path, net.eval(), {"model": config.to_dict(), "data": DataConfig(name="digits").to_dict()})
    return path


def run_row(dense, data, kind: str, rate: float, quant: str, args) -> dict[str, Any]:
    torch.manual_seed(0)
    net = copy.deepcopy(dense).train()
    train = TrainConfig(epochs=1, lr=args.lr, batch_size=128, augment=Augment.NONE, seed=0)
    quiet = lambda *_: None  # noqa: E731
    if kind == "admm":
        config = ADMMConfig(keep=1 / rate, quant=quant, rho=args.rho, admm_epochs=args.admm_epochs,
                            retrain_epochs=args.retrain_epochs)
        result = admm_prune_(net, data, config, train, progress=False, log=quiet)
    else:  # iterative magnitude pruning, the same epochs in total
        total = args.admm_epochs + args.retrain_epochs
        steps = min(args.imp_steps, total)
        for i in range(1, steps + 1):
            epochs = total // steps + (1 if i <= total % steps else 0)
            config = ADMMConfig(keep=rate ** (-i / steps), admm_epochs=0, retrain_epochs=epochs)
            result = admm_prune_(net, data, config, train, progress=False, log=quiet)
    net.eval()
    storage = storage_report(net, result, config)
    return {"kind": kind, "rate": rate, "quant": quant, "kept_fraction": result.kept_fraction(),
            "val_acc": evaluate(net, data.val)["acc"], "test_acc": evaluate(net, data.test)["acc"],
            "storage_bits": storage["bits"], "best_format": storage["best"],
            "compression": storage["compression"][storage["best"]], "dense_bits": storage["dense_float32_bits"],
            "rates": result.rates}


def cached_row(cache, settings: dict[str, Any], model_name: str, dense, data, kind: str, rate: float, quant: str,
               args) -> dict[str, Any]:
    """One row from the cache, or run and cache it."""
    return cache.get_or_run(
        f"{model_name}__{kind}__x{rate:g}__{quant.replace('=', '')}", settings, run_row, dense, data, kind, rate,
        quant, args, announce=f"{model_name} {kind} x{rate:g} {quant}: test acc {{test_acc:.4f}}, storage "
                              "{compression:.1f}x ({best_format})")


def verdict_variant(dense, base, data, data_cfg, kind: str, keep: float, metric: str, train: TrainConfig, args,
                    path: Path) -> dict[str, Any]:
    """Train one verdict variant from the dense weights, save it to ``path``; returns its row."""
    torch.manual_seed(0)
    net = copy.deepcopy(dense).train()
    config = ADMMConfig(pattern="group" if kind == "group" else "unstructured", keep=keep, group_metric=metric,
                        rho=args.rho, admm_epochs=args.verdict_epochs, retrain_epochs=args.verdict_epochs)
    result = admm_prune_(net, data, config, train, progress=False, log=lambda *_: None)
    net.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_compressed(path, net, base, [result.change] if result.change else [],
                    {"admm": config.to_dict(), "scales": result.scales, "data": data_cfg.to_dict()})
    return {"kind": kind, "keep": keep, "metric": metric if kind == "group" else "weights",
            "kept_fraction": result.kept_fraction(), "test_acc": evaluate(net, data.test)["acc"],
            "val_acc": evaluate(net, data.val)["acc"], "path": str(path.relative_to(args.out))}


def run_verdict(model_name: str, checkpoint: Path, cache, args, quick: bool) -> dict[str, Any]:
    """Group ADMM at the model's target, unstructured ADMM at the same kept weights, then ``prunekit compare``."""
    from prunekit.measurement.compare import compare_models, write_comparison

    dense, base, data_cfg = load_dense(None, checkpoint, None)
    data = load_dataset(data_cfg)
    train = TrainConfig(epochs=1, lr=0.01 if model_name == "resnet20" else args.lr, batch_size=128,
                        augment=Augment.CROP_FLIP if model_name == "resnet20" else Augment.NONE, seed=0)
    metric, keep = VERDICT_TARGETS[model_name]
    settings = {"checkpoint_sha256": st._sha256(checkpoint), "epochs": args.verdict_epochs, "rho": args.rho,
                "train": train.to_dict(), "target": [metric, keep]}
    rows = {}
    for kind in ("group", "unstructured"):
        key = f"verdict__{model_name}__{kind}"
        path = args.out / "models" / f"{model_name}-{kind}.safetensors"
        row = cache.get(key, settings)
        if row is None or not path.is_file():
            kept = keep if kind == "group" else rows["group"]["kept_fraction"]
            row = verdict_variant(dense, base, data, data_cfg, kind, kept, metric, train, args, path)
            cache.put(key, settings, row)
            print(f"{model_name} verdict {kind}: test acc {row['test_acc']:.4f}, keeps {row['kept_fraction']:.4f} "
                  "of the weights", flush=True)
        rows[kind] = row
    result = compare_models(checkpoint, {k: args.out / r["path"] for k, r in rows.items()},
                            min_run_time=0.05 if quick else 0.5, log=lambda *_: None)
    result["variants"] = rows
    write_comparison(result, args.out / f"verdict-{model_name}")
    return result


def verdict_markdown(model_name: str, result: dict[str, Any]) -> str:
    rows, v = result["rows"], result["verdict"]
    metric, keep = VERDICT_TARGETS[model_name]
    lines = [f"## {model_name}: group pruning to {keep:g} of the {metric} vs unstructured at the same weights", "",
             "| variant | test acc % | params | nonzero | MFLOPs | storage KiB (format) | dense-kernel ms | "
             "sparse-kernel ms | speedup vs dense |", "|---|---|---|---|---|---|---|---|---|"]
    dense_ms = rows["dense"]["latency_best_ms"]
    for name, r in rows.items():
        sparse = "-" if r["latency_sparse_kernel_ms"] is None else f"{r['latency_sparse_kernel_ms']:.2f}"
        lines.append(f"| {name} | {100 * r['test_acc']:.2f} | {r['params']:,} | {r['nonzero_params']:,} | "
                     f"{r['flops'] / 1e6:.2f} | {r['storage_bits'] / 8 / 1024:.1f} ({r['storage_format']}) | "
                     f"{r['latency_dense_kernel_ms']:.2f} | {sparse} | {dense_ms / r['latency_best_ms']:.2f}x |")
    be = result["break_even"]
    where = "never within the measured range" if be["break_even"] is None else f"from {100 * be['break_even']:.0f}%"
    lines += ["", f"Smallest storage: {v['storage']} ({v['storage_margin']:.2f}x smaller than the other); fastest: "
              f"{v['speed']} ({v['speed_margin']:.2f}x faster). The CSR kernel beats dense on the largest layer "
              f"({be['layer_shape'][0]}x{be['layer_shape'][1]}, batch {be['batch']}) {where} sparsity. Details and "
              f"plot: `verdict-{model_name}/compare.md`.", ""]
    return "\n".join(lines)


def table(model: str, dense_acc: float, rows: list[dict[str, Any]]) -> str:
    lines = [f"**{model}** (dense test accuracy {100 * dense_acc:.2f}%)", "",
             "| method | pruning rate | quantization | kept | test acc % | loss pt | best format | storage KiB | "
             "storage compression |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        bits = r["storage_bits"][r["best_format"]]
        lines.append(f"| {r['kind']} | {r['rate']:g}x | {r['quant']} | {r['kept_fraction']:.4f} | "
                     f"{100 * r['test_acc']:.2f} | {100 * (dense_acc - r['test_acc']):+.2f} | {r['best_format']} | "
                     f"{bits / 8 / 1024:.1f} | {r['compression']:.1f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="admm.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="*", default=None, choices=sorted(CHECKPOINTS),
                   help="models of the pruning-rate rows (default: both LeNets; none: skip)")
    p.add_argument("--rates", nargs="+", type=float, default=None, help="pruning rates (default 10 20 50 100)")
    p.add_argument("--admm-epochs", type=int, default=4)
    p.add_argument("--retrain-epochs", type=int, default=4)
    p.add_argument("--imp-steps", type=int, default=4)
    p.add_argument("--rho", type=float, default=1e-2)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--verdict", nargs="*", default=None, choices=sorted(VERDICT_CHECKPOINTS),
                   help="models of the structured vs non-structured verdict (default: lenet5 resnet20; none: skip)")
    p.add_argument("--verdict-epochs", type=int, default=1, help="ADMM and retraining epochs of each verdict variant")
    p.add_argument("--max-loss", type=float, default=1.0, help="accuracy points allowed for the highest rate")
    p.add_argument("--checkpoint-dir", type=Path, default=st.CHECKPOINT_DIR)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.models = ["lenet5"] if args.models is None else args.models
        args.rates = args.rates or [10.0]
        args.admm_epochs, args.retrain_epochs, args.imp_steps = 1, 1, 2
        torch.set_num_threads(1)
    if args.quick:
        args.verdict = ["lenet5"] if args.verdict is None else args.verdict
    args.verdict = sorted(VERDICT_CHECKPOINTS) if args.verdict is None else args.verdict
    args.models = ["lenet5", "lenet300"] if args.models is None else args.models
    args.rates = args.rates or [10.0, 20.0, 50.0, 100.0]
    if any(not r > 1 for r in args.rates):
        p.error(f"--rates must be > 1 (10 keeps a tenth of the weights), got {args.rates}")
    command = shlex.join(["python", "benchmarks/admm.py", *(sys.argv[1:] if argv is None else argv)])
    cache = st.RowCache(args.out / "cache")
    payload: dict[str, Any] = {"command": command, "models": {}}
    texts = []
    for model_name in args.models:
        if args.quick:
            checkpoint = quick_dense(cache.directory)
        else:
            checkpoint = args.checkpoint_dir / CHECKPOINTS[model_name]
            if not checkpoint.is_file():
                raise SystemExit(f"admm.py: error: {checkpoint} is missing; train it with "
                                 f"`bash benchmarks/checkpoints/train_baselines.sh {model_name}`")
        dense, _, data_cfg = load_dense(None, checkpoint, None)
        data = load_dataset(data_cfg)
        dense_acc = evaluate(dense, data.test)["acc"]
        settings = {"checkpoint_sha256": st._sha256(checkpoint), "admm_epochs": args.admm_epochs,
                    "retrain_epochs": args.retrain_epochs, "imp_steps": args.imp_steps, "rho": args.rho,
                    "lr": args.lr}
        rows = []

        for rate in args.rates:
            for kind in ("admm", "imp"):
                rows.append(cached_row(cache, settings, model_name, dense, data, kind, rate, "none", args))
        ok = [r for r in rows if r["kind"] == "admm" and 100 * (dense_acc - r["test_acc"]) <= args.max_loss]
        best_rate = max((r["rate"] for r in ok), default=min(args.rates))  # none within: quantize the lowest
        for quant in ("bits=3", "binary"):
            rows.append(cached_row(cache, settings, model_name, dense, data, "admm", best_rate, quant, args))
        payload["models"][model_name] = {"dense_test_acc": dense_acc, "highest_rate_within_loss": best_rate,
                                         "rows": rows}
        texts.append(table(model_name, dense_acc, rows))
        texts.append(f"Highest ADMM pruning rate within {args.max_loss:g} point(s): {best_rate:g}x." if ok else
                     f"No ADMM pruning rate stays within {args.max_loss:g} point(s); quantized at the lowest, "
                     f"{best_rate:g}x.")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.verdict:
        verdicts = {}
        for model_name in args.verdict:
            checkpoint = quick_dense(cache.directory) if args.quick else \
                args.checkpoint_dir / VERDICT_CHECKPOINTS[model_name]
            verdicts[model_name] = run_verdict(model_name, checkpoint, cache, args, args.quick)
        vmd = ["# Structured vs non-structured pruning on this CPU" + (" (quick smoke run)" if args.quick else ""),
               "", "Made by (from the repository root):", "", f"    {command}", "",
               f"Each variant: {args.verdict_epochs} ADMM epoch(s) (rho {args.rho:g}) + {args.verdict_epochs} "
               f"retraining epoch(s) from the dense checkpoint; latency at batch 64, "
               f"{torch.get_num_threads()} thread(s), medians.", ""]
        vmd += [verdict_markdown(m, r) for m, r in verdicts.items()]
        atomic_write(args.out / "verdict.md", lambda tmp: Path(tmp).write_text("\n".join(vmd)))
        print("\n".join(vmd))
    if not args.models:
        return 0
    atomic_write(args.out / "admm.json", lambda tmp: Path(tmp).write_text(json.dumps(payload, indent=1)))
    md = ["# ADMM-NN-S on the LeNets" + (" (quick smoke run)" if args.quick else ""), "",
          "Made by (from the repository root):", "", f"    {command}", "",
          f"ADMM {args.admm_epochs} epoch(s) (rho {args.rho:g}, x1.3 per epoch) + {args.retrain_epochs} masked "
          f"retraining epoch(s), SGD lr {args.lr}; IMP: {args.imp_steps} prune-retrain steps, the same epochs.", ""]
    md += [t + "\n" for t in texts]
    atomic_write(args.out / "admm.md", lambda tmp: Path(tmp).write_text("\n".join(md)))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
