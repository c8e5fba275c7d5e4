"""Recovery and deployment: accuracy right after pruning (before any training) and latency against the limit.

For ResNet-20 and VGG-11 on Fashion-MNIST (committed dense checkpoints) at FLOPs x2, x4, x8, with prunekit's
default pipeline (``prunekit.prune_`` with ``--method``'s registered config: L1 criterion, global allocation, at
most 90% of a group):

* test accuracy right after pruning with BatchNorm re-estimation only (512 training images), and with the
  least-squares re-fit first (``prunekit.recovery.reconstruction``, 256 images; the default), both before any training;
* test accuracy after ``--finetune-epochs`` (default 1) of fine-tuning (SGD lr 0.01, cosine, batch 128, crop+flip;
  the best-on-validation epoch): the budget of ``benchmarks/structured.py``, whose L1 rows are the same pipeline
  without the re-fit;
* latency (``prunekit.measurement.deploy.measure_against_limit``): dense, pruned and the *limit* -- the same
  architecture made uniformly thinner until its FLOPs match the pruned model's, built directly -- each in
  inference form (BatchNorm folded; eager PyTorch with the faster memory format, and ONNX Runtime with all graph
  optimisations), batch 1 and 64, all measured in alternation in one process, medians. Speedup = dense / pruned;
  fraction of the limit = speedup / the limit's speedup.

Rows (pruning + fine-tuning) and latencies are cached separately under ``<out>/cache``; fine-tuned models go to
``<out>/models/`` (git-ignored). Run latency on an idle machine: ``--remeasure-latency`` times every row again.

    python benchmarks/deploy.py                        # both models, x2 x4 x8
    python benchmarks/deploy.py --quick --out /tmp/q   # about a minute: digits, a small ResNet-20, x2
    python benchmarks/deploy.py --remeasure-latency    # the latency columns again, from the saved models
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

import prunekit
from common import (
    CHECKPOINT_DIR,
    CONV_MODELS,
    ROOT,
    RowCache,
    checkpoint_paths,
    method_config,
    prune_copy,
    quick_dense,
    sha256,
    write_json,
    write_text,
)
from prunekit.jobs import load_dense, width_builder
from prunekit.measurement.deploy import measure_against_limit
from prunekit.measurement.plots import plot_speedups

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "deploy"


def prune_row(dense, base: dict[str, Any], data, method: str, factor: float, args, model_path: Path
              ) -> dict[str, Any]:
    """Prune twice (BatchNorm only / re-fit + BatchNorm), fine-tune the default one, save it; the accuracy row."""
    accs = {}
    for label, images in (("bn_only", 0), ("refit", args.refit_images)):
        config = method_config(method, target=prunekit.Target("flops", 1.0 / factor),
                               allocation=prunekit.AllocationConfig("global", 0.9), reconstruction_images=images)
        t0 = time.perf_counter()
        net, record = prune_copy(dense, config, data)
        accs[label] = (record.test_acc_before_finetune, time.perf_counter() - t0)
    shape = (data.in_channels, data.input_size, data.input_size)
    finetune = prunekit.TrainConfig(epochs=args.finetune_epochs, lr=0.01, batch_size=128,
                                    augment=prunekit.Augment.CROP_FLIP, seed=0)
    fitted = prunekit.fit(net, data, finetune, progress=False) if args.finetune_epochs > 0 else None
    prunekit.save_compressed(model_path, net.eval(), base, record.changes, {
        "method": record.method, "config": config.to_dict(), "data": data.config.to_dict()})
    return {"params": prunekit.count_params(net), "flops": prunekit.count_flops(net, (1, *shape)),
            "test_acc_bn_only": accs["bn_only"][0], "test_acc_refit": accs["refit"][0],
            "seconds_prune_bn_only": accs["bn_only"][1], "seconds_prune_refit": accs["refit"][1],
            "test_acc": prunekit.evaluate(net, data.test)["acc"],
            "best_epoch": fitted.best_epoch if fitted is not None else None}


def latency_row(dense_path: Path, model_path: Path, args) -> dict[str, Any]:
    dense, meta = prunekit.load_compressed(dense_path)
    pruned, _ = prunekit.load_compressed(model_path)
    shape = (meta["model"]["in_channels"], meta["model"]["input_size"], meta["model"]["input_size"])
    result = measure_against_limit(pruned, dense, shape, width_builder(meta["model"]), threads=args.threads,
                                   batches=tuple(args.batches), repeats=args.repeats, min_run_time=args.min_run_time)
    return {"latency": result["rows"], "limit_width": result["limit_width"], "limit_flops": result["flops"]["limit"],
            "profile": result["profile"], "threads": result["threads"]}


def table(rows: list[dict[str, Any]], dense: dict[str, dict[str, Any]], batches: list[int]) -> str:
    head = ["model", "target", "params", "MFLOPs", "acc right after pruning: BN only %", "with re-fit %",
            "fine-tuned %"]
    for b in batches:
        head += [f"eager b{b} speedup", "limit", "fraction", f"ORT b{b} speedup", "limit", "fraction"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, d in dense.items():
        lines.append(f"| {name} | dense | {d['params']:,} | {d['flops'] / 1e6:.2f} | - | - | "
                     f"{100 * d['test_acc']:.2f} |" + " - |" * (6 * len(batches)))
        for r in (r for r in rows if r["model"] == name):
            cells = [name, f"x{r['factor']:g}", f"{r['params']:,}", f"{r['flops'] / 1e6:.2f}",
                     f"{100 * r['test_acc_bn_only']:.2f}", f"{100 * r['test_acc_refit']:.2f}",
                     f"{100 * r['test_acc']:.2f}"]
            by = {(x["engine"], x["batch"]): x for x in r["latency"]}
            for b in batches:
                for engine in ("eager", "onnxruntime"):
                    x = by[(engine, b)]
                    cells += [f"{x['speedup']:.2f}x", f"{x['limit_speedup']:.2f}x", f"{x['fraction_of_limit']:.2f}"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def readme_table(rows: list[dict[str, Any]]) -> str:
    """The README's latency table: speedup over dense, the limit's, and the fraction, per engine at each batch."""
    batches = sorted({x["batch"] for r in rows for x in r["latency"]})
    head = ["model", "FLOPs"] + [f"{e} b{b}: speedup / limit / fraction" for b in batches
                                 for e in ("eager", "ONNX Runtime")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        by = {(x["engine"], x["batch"]): x for x in r["latency"]}
        cells = [r["model"], f"x{r['factor']:g}"]
        for b in batches:
            for engine in ("eager", "onnxruntime"):
                x = by[(engine, b)]
                cells.append(f"{x['speedup']:.2f}x / {x['limit_speedup']:.2f}x / {x['fraction_of_limit']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="deploy.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=None, choices=sorted(CONV_MODELS))
    p.add_argument("--factors", nargs="+", type=float, default=None, help="FLOPs reductions (default 2 4 8)")
    p.add_argument("--method", default="l1", help="pruning criterion (default: prunekit's default, l1)")
    p.add_argument("--refit-images", type=int, default=256)
    p.add_argument("--finetune-epochs", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="latency threads (default: torch's)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--min-run-time", type=float, default=0.3)
    p.add_argument("--checkpoint-dir", type=Path, default=CHECKPOINT_DIR)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--quick", action="store_true", help="about a minute: digits, a small resnet20, x2")
    p.add_argument("--remeasure-latency", action="store_true", help="time every row again (idle machine)")
    args = p.parse_args(argv)
    try:
        prunekit.get_method(args.method)
    except ValueError as exc:
        p.error(f"--method: {exc}")
    if args.quick:
        args.models, args.factors = ["resnet20"], args.factors or [2.0]
        args.finetune_epochs, args.repeats, args.min_run_time = 1, 1, 0.02
        args.batches, args.threads, args.refit_images = [1, 16], args.threads or 1, 64
    args.models = args.models or ["resnet20", "vgg11"]
    args.factors = args.factors or [2.0, 4.0, 8.0]
    if any(not f > 1 for f in args.factors):
        p.error(f"--factors must be > 1, got {args.factors}")
    if args.refit_images < 1 or args.finetune_epochs < 0 or args.repeats < 1 or any(b < 1 for b in args.batches):
        p.error("--refit-images, --repeats and --batches must be >= 1 and --finetune-epochs >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(["python", "benchmarks/deploy.py", *(sys.argv[1:] if argv is None else argv)])
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cache = RowCache(args.out / "cache")
    models_dir = args.out / "models"
    models_dir.mkdir(parents=True, exist_ok=True)
    if args.quick:
        paths = {"resnet20": quick_dense(cache.directory, "resnet20", log=print)}
    else:
        paths = checkpoint_paths(args.models, args.checkpoint_dir)
    rows, dense_rows = [], {}
    for name in args.models:
        dense, base, data_cfg = load_dense(None, paths[name], None)
        data = prunekit.load_dataset(data_cfg)
        shape = (data.in_channels, data.input_size, data.input_size)
        dense_rows[name] = {"params": prunekit.count_params(dense), "flops": prunekit.count_flops(dense, (1, *shape)),
                            "test_acc": prunekit.evaluate(dense, data.test)["acc"], "checkpoint": str(paths[name])}
        settings = {"checkpoint_sha256": sha256(paths[name]), "method": args.method,
                    "refit_images": args.refit_images, "finetune_epochs": args.finetune_epochs}
        lat_settings = {**settings, "threads": args.threads or torch.get_num_threads(), "batches": args.batches,
                        "repeats": args.repeats, "min_run_time": args.min_run_time}
        for factor in args.factors:
            key = f"{name}__{args.method}__x{factor:g}"
            model_path = models_dir / f"{key}.safetensors"
            row = cache.get_or_run(key, settings, prune_row, dense, base, data, args.method, factor, args, model_path,
                                   announce=f"{name} x{factor:g}: test acc right after pruning {{test_acc_bn_only:.4f}}"
                                            " (BN only) / {test_acc_refit:.4f} (re-fit), fine-tuned {test_acc:.4f}")
            if not model_path.is_file():  # the row is cached but its model is not (a fresh clone)
                raise SystemExit(f"deploy.py: error: {model_path} is missing; delete {cache.path(key)} to run the "
                                 "row again")
            if args.remeasure_latency:
                cache.path(f"{key}__latency").unlink(missing_ok=True)
            lat = cache.get_or_run(f"{key}__latency", lat_settings, latency_row, paths[name], model_path, args)
            rows.append({"model": name, "factor": factor, **row, **lat})
            for x in lat["latency"]:
                print(f"{name} x{factor:g} {x['engine']:>11} b{x['batch']}: speedup {x['speedup']:.2f}x, limit "
                      f"{x['limit_speedup']:.2f}x, fraction {x['fraction_of_limit']:.2f}", flush=True)
    out = args.out
    payload = {"command": command, "quick": args.quick, "torch": torch.__version__, "dense": dense_rows,
               "rows": rows}
    write_json(out / "deploy.json", payload)
    for r in rows:
        plot_speedups(r["latency"], out / f"speedups_{r['model']}_x{r['factor']:g}.png",
                      title=f"{r['model']} x{r['factor']:g} FLOPs ({args.method}, re-fit, fine-tuned)")
    profile = rows[-1]["profile"] if rows else []
    md = ["# Recovery and deployment" + (" (quick smoke run)" if args.quick else ""), "",
          "Made by (from the repository root):", "", f"    {command}", "",
          f"Pruning: {args.method}, global allocation (at most 90% of a group), BatchNorm re-estimated on 512 images; "
          f"re-fit on {args.refit_images} images; fine-tuning {args.finetune_epochs} epoch(s). Latency: "
          f"{rows[0]['threads'] if rows else '-'} thread(s), torch {torch.__version__}, medians of "
          f"{args.repeats} alternated runs; limit = the uniformly thinned network of the same FLOPs.", "",
          table(rows, dense_rows, args.batches), ""]
    if profile:
        md += [f"Where the eager time of the last row ({rows[-1]['model']} x{rows[-1]['factor']:g}) goes, batch "
               f"{max(args.batches)}:", "", "| op | ms per forward | share |", "|---|---|---|"]
        md += [f"| {p['op']} | {p['ms_per_forward']:.3f} | {100 * p['share']:.1f}% |" for p in profile]
    write_text(out / "deploy.md", "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
