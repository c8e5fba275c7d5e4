"""ADMM-NN-S on the dense Fashion-MNIST LeNets: how far non-structured pruning goes within 1 point of accuracy, and
what joint quantization does to the storage once indices and scales are counted.

For LeNet-5 and LeNet-300-100 (committed checkpoints), every row starts from the dense weights:

* ``admm``: unstructured ADMM pruning (``prunekit.prune_`` with ``prunekit.ADMMConfig``, ``--admm-epochs``)
  keeping 1/rate of the weights (global magnitude allocation over all layers, the classifier included), then masked
  retraining (``--retrain-epochs``);
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
import shlex
import sys
from pathlib import Path
from typing import Any

import torch

import prunekit
from common import (
    CHECKPOINT_DIR,
    LENETS,
    ROOT,
    RowCache,
    checkpoint_paths,
    prune_copy,
    quick_dense,
    quiet,
    sha256,
    write_json,
    write_text,
)
from prunekit.jobs import load_dense
from prunekit.measurement.formats import encoding_storage

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "admm"
VERDICT_MODELS = ("lenet5", "resnet20")
VERDICT_TARGETS = {"lenet5": ("params", 0.1), "resnet20": ("flops", 0.25)}
# ResNet-20 trains as the structural benchmarks fine-tune (the LeNets: --lr, no augmentation)
VERDICT_TRAIN = {"resnet20": (0.01, prunekit.Augment.CROP_FLIP)}


def admm_configs(rate: float, quant: str, args) -> list[prunekit.ADMMConfig]:
    """ADMM keeping 1/rate of the weights, masked retraining and, with ``quant``, joint quantization."""
    return [prunekit.ADMMConfig(target=prunekit.Target("params", 1 / rate), quant=quant, rho=args.rho,
                                admm_epochs=args.admm_epochs, retrain_epochs=args.retrain_epochs)]


def imp_configs(rate: float, quant: str, args) -> list[prunekit.ADMMConfig]:
    """Iterative magnitude pruning with the same epochs in total: ``--imp-steps`` ADMM runs without ADMM epochs,
    each a global magnitude prune to the next rate followed by masked retraining (``quant`` is not used)."""
    total = args.admm_epochs + args.retrain_epochs
    steps = min(args.imp_steps, total)
    return [prunekit.ADMMConfig(target=prunekit.Target("params", rate ** (-i / steps)), admm_epochs=0,
                                retrain_epochs=total // steps + (1 if i <= total % steps else 0))
            for i in range(1, steps + 1)]


ROW_KINDS = {"admm": admm_configs, "imp": imp_configs}


def run_row(dense, data, kind: str, rate: float, quant: str, args) -> dict[str, Any]:
    """The ``kind`` row's configs run one after the other (``prunekit.prune_``) on a copy of ``dense``."""
    torch.manual_seed(0)
    net = copy.deepcopy(dense).train()
    context = prunekit.RunContext(train=prunekit.TrainConfig(epochs=1, lr=args.lr, batch_size=128,
                                                             augment=prunekit.Augment.NONE, seed=0),
                                  seed=0, progress=False, log=quiet)
    for config in ROW_KINDS[kind](rate, quant, args):
        record = prunekit.prune_(net, config, data, context)
    net.eval()
    storage = encoding_storage(net, record.encoding, 32 * sum(p.numel() for p in dense.parameters()))
    return {"kind": kind, "rate": rate, "quant": quant, "kept_fraction": record.results["kept_fraction"],
            "val_acc": prunekit.evaluate(net, data.val)["acc"], "test_acc": prunekit.evaluate(net, data.test)["acc"],
            "storage_bits": storage["bits"], "best_format": storage["best"],
            "compression": storage["compression"][storage["best"]], "dense_bits": storage["dense_float32_bits"],
            "rates": record.results["rates"]}


def cached_row(cache, settings: dict[str, Any], model_name: str, dense, data, kind: str, rate: float, quant: str,
               args) -> dict[str, Any]:
    """One row from the cache, or run and cache it."""
    return cache.get_or_run(
        f"{model_name}__{kind}__x{rate:g}__{quant.replace('=', '')}", settings, run_row, dense, data, kind, rate,
        quant, args, announce=f"{model_name} {kind} x{rate:g} {quant}: test acc {{test_acc:.4f}}, storage "
                              "{compression:.1f}x ({best_format})")


def verdict_variant(dense, base, data, config: prunekit.ADMMConfig, train: prunekit.TrainConfig, metric: str,
                    args, path: Path) -> dict[str, Any]:
    """Train one verdict variant (``prunekit.prune_``) from the dense weights, save it to ``path``; returns its
    row."""
    net, record = prune_copy(dense, config, data, train=train)
    net.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    prunekit.save_compressed(path, net, base, record.changes, {
        "method": record.method, "config": config.to_dict(), "encoding": record.encoding,
        "data": data.config.to_dict()})
    return {"kind": config.pattern.value, "keep": config.target.keep, "metric": metric,
            "kept_fraction": record.results["kept_fraction"], "test_acc": prunekit.evaluate(net, data.test)["acc"],
            "val_acc": prunekit.evaluate(net, data.val)["acc"], "path": str(path.relative_to(args.out))}


def run_verdict(model_name: str, checkpoint: Path, cache, args, quick: bool) -> dict[str, Any]:
    """Group ADMM at the model's target, unstructured ADMM at the same kept weights, then ``prunekit compare``."""
    from prunekit.measurement.compare import compare_models, write_comparison

    dense, base, data_cfg = load_dense(None, checkpoint, None)
    data = prunekit.load_dataset(data_cfg)
    lr, augment = VERDICT_TRAIN.get(model_name, (args.lr, prunekit.Augment.NONE))
    train = prunekit.TrainConfig(epochs=1, lr=lr, batch_size=128, augment=augment, seed=0)
    metric, keep = VERDICT_TARGETS[model_name]
    settings = {"checkpoint_sha256": sha256(checkpoint), "epochs": args.verdict_epochs, "rho": args.rho,
                "train": train.to_dict(), "target": [metric, keep]}
    rows: dict[str, dict[str, Any]] = {}
    # the group variant keeps whole coupled channels; the unstructured one then keeps as many weights
    variants = (("group", lambda: (prunekit.Target(metric, keep), metric)),
                ("unstructured", lambda: (prunekit.Target("params", rows["group"]["kept_fraction"]), "weights")))
    for pattern, target_of in variants:
        key = f"verdict__{model_name}__{pattern}"
        path = args.out / "models" / f"{model_name}-{pattern}.safetensors"
        row = cache.get(key, settings)
        if row is None or not path.is_file():
            target, what = target_of()
            config = prunekit.ADMMConfig(pattern=pattern, target=target, rho=args.rho,
                                         admm_epochs=args.verdict_epochs, retrain_epochs=args.verdict_epochs)
            row = verdict_variant(dense, base, data, config, train, what, args, path)
            cache.put(key, settings, row)
            print(f"{model_name} verdict {pattern}: test acc {row['test_acc']:.4f}, keeps {row['kept_fraction']:.4f} "
                  "of the weights", flush=True)
        rows[pattern] = row
    result = compare_models(checkpoint, {k: args.out / r["path"] for k, r in rows.items()},
                            min_run_time=0.05 if quick else 0.5, log=lambda *_: None)
    result["variants"] = rows
    write_comparison(result, args.out / f"verdict-{model_name}", overwrite=True)  # the benchmark owns its folder
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
    p.add_argument("--models", nargs="*", default=None, choices=sorted(LENETS),
                   help="models of the pruning-rate rows (default: both LeNets; none: skip)")
    p.add_argument("--rates", nargs="+", type=float, default=None, help="pruning rates (default 10 20 50 100)")
    p.add_argument("--admm-epochs", type=int, default=4)
    p.add_argument("--retrain-epochs", type=int, default=4)
    p.add_argument("--imp-steps", type=int, default=4)
    p.add_argument("--rho", type=float, default=1e-2)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--verdict", nargs="*", default=None, choices=sorted(VERDICT_MODELS),
                   help="models of the structured vs non-structured verdict (default: lenet5 resnet20; none: skip)")
    p.add_argument("--verdict-epochs", type=int, default=1, help="ADMM and retraining epochs of each verdict variant")
    p.add_argument("--max-loss", type=float, default=1.0, help="accuracy points allowed for the highest rate")
    p.add_argument("--checkpoint-dir", type=Path, default=CHECKPOINT_DIR)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.models = ["lenet5"] if args.models is None else args.models
        args.rates = args.rates or [10.0]
        args.admm_epochs, args.retrain_epochs, args.imp_steps = 1, 1, 2
        args.verdict = ["lenet5"] if args.verdict is None else args.verdict
        torch.set_num_threads(1)
    args.verdict = sorted(VERDICT_MODELS) if args.verdict is None else args.verdict
    args.models = list(LENETS) if args.models is None else args.models
    args.rates = args.rates or [10.0, 20.0, 50.0, 100.0]
    if any(not r > 1 for r in args.rates):
        p.error(f"--rates must be > 1 (10 keeps a tenth of the weights), got {args.rates}")
    command = shlex.join(["python", "benchmarks/admm.py", *(sys.argv[1:] if argv is None else argv)])
    cache = RowCache(args.out / "cache")

    def checkpoint_of(model_name: str, accepted: tuple[str, ...]) -> Path:
        if args.quick:
            return quick_dense(cache.directory, "lenet5")
        return checkpoint_paths([model_name], args.checkpoint_dir, accepted)[model_name]

    payload: dict[str, Any] = {"command": command, "models": {}}
    texts = []
    for model_name in args.models:
        checkpoint = checkpoint_of(model_name, LENETS)
        dense, _, data_cfg = load_dense(None, checkpoint, None)
        data = prunekit.load_dataset(data_cfg)
        dense_acc = prunekit.evaluate(dense, data.test)["acc"]
        settings = {"checkpoint_sha256": sha256(checkpoint), "admm_epochs": args.admm_epochs,
                    "retrain_epochs": args.retrain_epochs, "imp_steps": args.imp_steps, "rho": args.rho,
                    "lr": args.lr}
        rows, ok = [], []
        for rate in args.rates:
            admm, imp = (cached_row(cache, settings, model_name, dense, data, kind, rate, "none", args)
                         for kind in ROW_KINDS)
            rows += [admm, imp]
            if 100 * (dense_acc - admm["test_acc"]) <= args.max_loss:
                ok.append(rate)
        best_rate = max(ok, default=min(args.rates))  # none within: quantize the lowest
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
            verdicts[model_name] = run_verdict(model_name, checkpoint_of(model_name, VERDICT_MODELS), cache, args,
                                               args.quick)
        vmd = ["# Structured vs non-structured pruning on this CPU" + (" (quick smoke run)" if args.quick else ""),
               "", "Made by (from the repository root):", "", f"    {command}", "",
               f"Each variant: {args.verdict_epochs} ADMM epoch(s) (rho {args.rho:g}) + {args.verdict_epochs} "
               f"retraining epoch(s) from the dense checkpoint; latency at batch 64, "
               f"{torch.get_num_threads()} thread(s), medians.", ""]
        vmd += [verdict_markdown(m, r) for m, r in verdicts.items()]
        write_text(args.out / "verdict.md", "\n".join(vmd))
        print("\n".join(vmd))
    if not args.models:
        return 0
    write_json(args.out / "admm.json", payload)
    md = ["# ADMM-NN-S on the LeNets" + (" (quick smoke run)" if args.quick else ""), "",
          "Made by (from the repository root):", "", f"    {command}", "",
          f"ADMM {args.admm_epochs} epoch(s) (rho {args.rho:g}, x1.3 per epoch) + {args.retrain_epochs} masked "
          f"retraining epoch(s), SGD lr {args.lr}; IMP: {args.imp_steps} prune-retrain steps, the same epochs.", ""]
    md += [t + "\n" for t in texts]
    write_text(args.out / "admm.md", "\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
