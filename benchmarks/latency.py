"""Latency as the target: prune to a measured speedup on this machine (``--target latency=xS``) against pruning to
the FLOPs count that gives the same measured speed, and what rounding kept widths (``--round-to``) does to speed.

Target rows (``--models``, ``--engines``, ``--batches``, ``--speedups``, ``--criteria``): from the committed dense
Fashion-MNIST checkpoint, for each engine (eager PyTorch, ONNX Runtime), batch size and speedup ``S``:

* **latency-targeted**: one-shot pruning with the criterion to ``latency=xS`` (global allocation, at most 90% of a
  group, no least-squares re-fit, BatchNorm re-estimated on 512 images): the per-layer latency table of the dense
  network is measured in that engine, batch and thread count (cached under ``<out>/cache``), kept widths are on the
  multiple of 1, 4, 8 or 16 whose plan removes the least importance, and the plan is checked by measurement (up to
  two corrections);
* **FLOPs-targeted at equal measured speed**: the same criterion and recipe to ``flops=1/f``, where ``f`` is
  searched (secant steps on measured speedups, at most ``--search-steps`` measurements) until the network is as fast
  as the latency-targeted one measured; the closest is kept and its measured speed reported;

then both fine-tune ``--finetune-epochs`` with prunekit's fine-tuning recipe (SGD lr 0.01, warm-up over 15% of the
steps then cosine, batch 128, crop+flip, seed 0) and report test accuracy of the best-on-validation epoch. Every
speedup is dense over pruned, each network in its inference form (BatchNorm folded; ONNX Runtime with all graph
optimisations), measured in alternation with the dense network (median of 5). Each pruned network is also
measured in the other engine at the same batch (the goal that ONNX Runtime reaches at least the eager speedup).

Rounding rows (``--round-factors``): L1 one-shot to 1/f of the FLOPs with ``--round-to`` 1, 4, 8 and 16, each
network's measured speedup in every engine and batch; no fine-tuning (rounding changes speed, not the recipe).

    python benchmarks/latency.py --threads 1              # ResNet-20, VGG-11; eager, onnxruntime; b64, b1; x3, x2
    python benchmarks/latency.py --quick --out /tmp/q     # a minute: digits, a small ResNet-20, eager b64, x1.25

Every finished row is cached in ``<out>/cache``; an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import prunekit
from common import (
    ROOT,
    dense_summary,
    fmt_acc,
    git_commit,
    model_settings,
    prune_copy,
    run_setup,
    structural_config,
    write_json,
    write_text,
)
from prunekit.measurement.latency_table import ROUNDINGS, Engine, LatencySettings, measure_speedup

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "latency"
MEASURING = {"search_steps": (5, 2), "corrections": (2, 0), "grid": (8, 2), "min_run_time": (0.05, 0.01),
             "measure_time": (0.2, 0.05)}  # flag: (default, --quick default)
ENGINES = tuple(e.value for e in Engine)


def _latency(engine: str, batch: int, args) -> LatencySettings:
    return LatencySettings(engine=engine, batch=batch, threads=torch.get_num_threads(),
                           grid=args.grid, min_run_time=args.min_run_time, corrections=args.corrections)


def _speedup(dense, net, data, engine: str, batch: int, args) -> float:
    shape = (data.in_channels, data.input_size, data.input_size)
    return measure_speedup(dense, net, shape, _latency(engine, batch, args), repeats=5,
                           min_run_time=args.measure_time)["speedup"]


def _config(criterion: str, target: prunekit.Target, s, latency: LatencySettings | None = None, round_to=None):
    config = structural_config(criterion, target.keep, s, kind=target.metric.value)
    allocation = replace(config.allocation, round_to=round_to,
                         **({"latency": latency} if latency is not None else {}))
    return replace(config, allocation=allocation)


def _finish(dense, net, data, s, engine: str, batch: int, args, progress: bool) -> dict[str, Any]:
    """Fine-tune, evaluate, and measure the speedup in both engines at ``batch``."""
    val_pruned = prunekit.evaluate(net, data.val)["acc"]
    torch.manual_seed(s.seed)
    result = prunekit.fit(net, data, s.finetune, progress=progress)
    net.eval()
    shape = (1, data.in_channels, data.input_size, data.input_size)
    speed = {e: _speedup(dense, net, data, e, batch, args) for e in args.engines_measured}
    return {"val_acc_pruned": val_pruned, "val_acc": result.best_val_acc,
            "test_acc": prunekit.evaluate(net, data.test)["acc"], "flops": prunekit.count_flops(net, shape),
            "params": prunekit.count_params(net), "measured": speed, "measured_speedup": speed[engine],
            "widths": {n: m.out_channels for n, m in net.named_modules() if isinstance(m, torch.nn.Conv2d)}}


def latency_row(model_name, criterion, engine, batch, speedup, dense, data, s, dense_row, args, progress):
    """Prune to ``latency=x{speedup}``, fine-tune, measure."""
    t0 = time.perf_counter()
    config = _config(criterion, prunekit.Target("latency", 1 / speedup), s, _latency(engine, batch, args))
    row = {"model": model_name, "criterion": criterion, "engine": engine, "batch": batch, "speedup": speedup,
           "target": "latency"}
    try:
        net, record = prune_copy(dense, config, data, s.seed)
    except prunekit.InfeasibleTargetError as exc:  # a result: the table says this speed cannot be reached
        return {**row, "infeasible": str(exc), "measured_speedup": float("nan"), "test_acc": float("nan"),
                "seconds": time.perf_counter() - t0}
    row.update({"predicted_speedup": record.predicted_speedup, "round_to": record.rounds[-1].get("round_to"),
           "measured_before_finetune": _speedup(dense, net, data, engine, batch, args)})
    row.update(_finish(dense, net, data, s, engine, batch, args, progress))
    row.update(flops_reduction=dense_row["flops"] / row["flops"], seconds=time.perf_counter() - t0)
    return row


def flops_row(model_name, criterion, engine, batch, speedup, dense, data, s, dense_row, reference, args, progress):
    """The FLOPs target whose network measures as fast as ``reference`` (the latency-targeted row), fine-tuned."""
    t0 = time.perf_counter()
    goal = reference["measured_before_finetune"]
    tried: list[dict[str, float]] = []

    def measure(factor: float):
        config = _config(criterion, prunekit.Target("flops", 1 / factor), s)
        net, _ = prune_copy(dense, config, data, s.seed)
        tried.append({"flops_factor": factor, "measured": _speedup(dense, net, data, engine, batch, args)})
        return net

    factor, nets = reference["flops_reduction"], {}
    for _ in range(args.search_steps):
        nets[factor] = measure(factor)
        if abs(tried[-1]["measured"] / goal - 1) <= 0.03:
            break
        points = sorted(tried, key=lambda p: abs(math.log(p["measured"] / goal)))[:2]
        if len(points) == 2 and points[0]["measured"] != points[1]["measured"]:  # secant in log-log
            (f0, m0), (f1, m1) = ((p["flops_factor"], p["measured"]) for p in points)
            slope = (math.log(m1) - math.log(m0)) / (math.log(f1) - math.log(f0)) if f1 != f0 else 1.0
            slope = slope if slope > 0.1 else 1.0
            factor = math.exp(math.log(f0) + (math.log(goal) - math.log(m0)) / slope)
        else:
            factor = factor * goal / tried[-1]["measured"]
        factor = min(max(factor, 1.05), 64.0)
        if any(abs(factor / p["flops_factor"] - 1) < 0.005 for p in tried):
            break
    best = min(tried, key=lambda p: abs(math.log(p["measured"] / goal)))
    net = nets[best["flops_factor"]]
    row = {"model": model_name, "criterion": criterion, "engine": engine, "batch": batch, "speedup": speedup,
           "target": "flops", "flops_factor": best["flops_factor"], "measured_before_finetune": best["measured"],
           "search": tried}
    row.update(_finish(dense, net, data, s, engine, batch, args, progress))
    row.update(flops_reduction=dense_row["flops"] / row["flops"], seconds=time.perf_counter() - t0)
    return row


def rounding_row(model_name, factor, round_to, dense, data, s, dense_row, args):
    """L1 one-shot to 1/factor of the FLOPs with widths on multiples of ``round_to``: speedups everywhere."""
    config = _config("l1", prunekit.Target("flops", 1 / factor), s, round_to=round_to)
    try:
        net, _ = prune_copy(dense, config, data, s.seed)
    except prunekit.InfeasibleTargetError as exc:  # a result: groups this narrow cannot keep a multiple of it
        return {"model": model_name, "factor": factor, "round_to": round_to, "speedup": {}, "infeasible": str(exc)}
    shape = (1, data.in_channels, data.input_size, data.input_size)
    speed = {f"{e} b{b}": _speedup(dense, net, data, e, b, args) for e in args.engines for b in args.batches}
    return {"model": model_name, "factor": factor, "round_to": round_to, "speedup": speed,
            "flops_reduction": dense_row["flops"] / prunekit.count_flops(net, shape)}


# ------------------------------------------------------------------------------------------------- tables


def target_table(rows: list[dict[str, Any]], dense: dict[str, dict[str, Any]]) -> str:
    """Latency-targeted against FLOPs-targeted at equal measured speed, per model, engine, batch, speedup and
    criterion."""
    header = ["model", "engine", "batch", "target", "criterion",
              "latency-targeted: predicted / measured speedup, FLOPs red., widths on multiples of", "test acc %",
              "FLOPs-targeted: measured speedup, FLOPs red.", "test acc %", "latency - FLOPs",
              "ONNX Runtime >= eager (latency / FLOPs row)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    pairs: dict[tuple, dict[str, dict[str, Any]]] = {}
    for r in rows:
        pairs.setdefault((r["model"], r["engine"], r["batch"], r["speedup"], r["criterion"]), {})[r["target"]] = r
    for (model, engine, batch, speedup, criterion), pair in pairs.items():
        lat, flo = pair.get("latency"), pair.get("flops")
        if lat is not None and "infeasible" in lat:
            lines.append(f"| {model} ({fmt_acc(dense[model]['test_acc'])}) | {engine} | {batch} | x{speedup:g} | "
                         f"{criterion} | infeasible: {lat['infeasible'].split(':')[1].split(';')[0].strip()} | - | - "
                         "| - | - | - |")
            continue
        if lat is None or flo is None:
            continue
        diff = 100 * (lat["test_acc"] - flo["test_acc"])
        lines.append(
            f"| {model} ({fmt_acc(dense[model]['test_acc'])}) | {engine} | {batch} | x{speedup:g} | {criterion} | "
            f"{lat['predicted_speedup']:.2f}x / {lat['measured_speedup']:.2f}x, {lat['flops_reduction']:.2f}x, "
            f"{rounding_of(lat['widths'], dense[model]['widths'])} | {fmt_acc(lat['test_acc'])} | "
            f"{flo['measured_speedup']:.2f}x, {flo['flops_reduction']:.2f}x | {fmt_acc(flo['test_acc'])} | "
            f"{diff:+.2f} | {_onnx_goal(lat)} / {_onnx_goal(flo)} |")
    return "\n".join(lines)


def rounding_of(widths: dict[str, int], dense: dict[str, int]) -> int:
    """The largest of 16, 8, 4, 1 that every thinned conv width is a multiple of."""
    thinned = [w for n, w in widths.items() if w < dense.get(n, w)]
    return max(r for r in ROUNDINGS if all(w % r == 0 for w in thinned))


def _onnx_goal(row: dict[str, Any]) -> str:
    m = row["measured"]
    if "onnxruntime" not in m or "eager" not in m:
        return "-"
    return f"{'yes' if m['onnxruntime'] >= m['eager'] else 'no'} ({m['onnxruntime']:.2f}x vs {m['eager']:.2f}x)"


def goals(rows: list[dict[str, Any]]) -> str:
    """The issue's two goals, counted over the measured pairs."""
    pairs: dict[tuple, dict[str, dict[str, Any]]] = {}
    for r in rows:
        pairs.setdefault((r["model"], r["engine"], r["batch"], r["speedup"], r["criterion"]), {})[r["target"]] = r
    at3 = [100 * (p["latency"]["test_acc"] - p["flops"]["test_acc"]) for k, p in pairs.items()
           if k[3] == 3 and {"latency", "flops"} <= set(p) and "infeasible" not in p["latency"]]
    pruned = [r for r in rows if "infeasible" not in r and {"eager", "onnxruntime"} <= set(r["measured"])]
    onnx = sum(r["measured"]["onnxruntime"] >= r["measured"]["eager"] for r in pruned)
    infeasible = sum("infeasible" in r for r in rows)
    lines = []
    if at3:
        met = sum(d >= 0.5 for d in at3)
        lines.append(f"- Goal: latency-targeted at least 0.5 point more accurate than FLOPs-targeted at equal measured "
                     f"speed at x3: met in {met} of {len(at3)} pairs (differences {', '.join(f'{d:+.2f}' for d in at3)}"
                     f"; mean {sum(at3) / len(at3):+.2f}).")
    if pruned:
        lines.append(f"- Goal: ONNX Runtime reaches at least the eager speedup: {onnx} of {len(pruned)} pruned "
                     "networks.")
    if infeasible:
        lines.append(f"- {infeasible} latency target(s) out of reach under the per-layer cap (rows marked infeasible).")
    return "\n".join(lines)


def rounding_table(rows: list[dict[str, Any]]) -> str:
    """Measured speedup of L1 at a FLOPs target per ``--round-to``, in every engine and batch."""
    columns = sorted({k for r in rows for k in r["speedup"]}, key=lambda k: (k.split()[0], -int(k.split()[1][1:])))
    header = ["model", "FLOPs target", "round_to", "FLOPs red.", *columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        if "infeasible" in r:
            lines.append(f"| {r['model']} | x{r['factor']:g} | {r['round_to']} | infeasible | "
                         + " | ".join("-" for _ in columns) + " |")
            continue
        cells = [f"{r['speedup'][c]:.2f}x" if c in r["speedup"] else "-" for c in columns]
        lines.append(f"| {r['model']} | x{r['factor']:g} | {r['round_to']} | {r['flops_reduction']:.2f}x | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="latency.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=None, help="default: resnet20 vgg11")
    p.add_argument("--engines", nargs="+", choices=ENGINES, default=None, help="default: eager onnxruntime")
    p.add_argument("--batches", nargs="+", type=int, default=None, help="default: 64 1")
    p.add_argument("--speedups", nargs="+", type=float, default=None, help="latency targets (default 3 2)")
    p.add_argument("--criteria", nargs="+", default=None, help="default: l2 taylor (the structured table's best)")
    p.add_argument("--round-factors", nargs="*", type=float, default=None, help="FLOPs targets of the rounding rows "
                                                                                "(default 2 3)")
    p.add_argument("--finetune-epochs", type=int, default=1)
    p.add_argument("--search-steps", type=int, default=None,
                   help="measurements to find the FLOPs target's speed (default 5; --quick 2)")
    p.add_argument("--latency-corrections", dest="corrections", type=int, default=None,
                   help="re-plans of a latency target after measuring it (default 2; --quick 0)")
    p.add_argument("--latency-grid", dest="grid", type=int, default=None,
                   help="latency table widths per layer dimension (default 8; --quick 2)")
    p.add_argument("--latency-run-time", dest="min_run_time", type=float, default=None,
                   help="seconds per latency table point (default 0.05; --quick 0.01)")
    p.add_argument("--measure-time", type=float, default=None,
                   help="seconds per measured speedup, x5, alternated (default 0.2; --quick 0.05)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N training images (smoke runs)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--checkpoint-dir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--quick", action="store_true", help="about a minute: digits, a small ResNet-20, eager b64, "
                                                        "x1.25")
    p.add_argument("--cached-only", action="store_true", help="write the tables from the rows cached so far")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    quick = args.quick
    args.models = args.models or (["resnet20"] if quick else ["resnet20", "vgg11"])
    args.engines = args.engines or (["eager"] if quick else list(ENGINES))
    args.batches = args.batches or ([64] if quick else [64, 1])
    args.speedups = args.speedups or ([1.25] if quick else [3.0, 2.0])
    args.criteria = args.criteria or (["l2"] if quick else ["l2", "taylor"])
    args.round_factors = args.round_factors if args.round_factors is not None else ([2.0] if quick else [2.0, 3.0])
    for name, (full, short) in MEASURING.items():  # what the user gave stands, --quick or not
        if getattr(args, name) is None:
            setattr(args, name, short if quick else full)
    if quick:
        args.threads = args.threads or 1
        args.limit = 600 if args.limit is None else args.limit
    if any(b < 1 for b in args.batches) or any(x <= 1 for x in args.speedups):
        p.error(f"--batches must be >= 1 and --speedups > 1, got {args.batches} and {args.speedups}")
    if args.search_steps < 1 or args.finetune_epochs < 0 or (args.limit is not None and args.limit < 1):
        p.error(f"--search-steps must be >= 1, --finetune-epochs >= 0 and --limit >= 1, got {args.search_steps}, "
                f"{args.finetune_epochs} and {args.limit}")
    if not 0 < args.measure_time <= 600:  # also refuses NaN
        p.error(f"--measure-time must be seconds in (0, 600], got {args.measure_time}")
    try:  # the flags of prunekit's own latency settings, named as in `prunekit prune`
        LatencySettings(grid=args.grid, min_run_time=args.min_run_time, corrections=args.corrections)
    except ValueError as exc:
        p.error(str(exc))
    unknown = [c for c in args.criteria if c not in prunekit.list_methods()]
    if unknown:
        p.error(f"unknown --criteria {unknown}; accepted: the channel criteria of `prunekit list methods`")
    if "onnxruntime" in args.engines:
        try:
            LatencySettings(engine="onnxruntime")
        except ValueError as exc:
            p.error(str(exc))
    if args.checkpoint_dir is None:
        from common import CHECKPOINT_DIR

        args.checkpoint_dir = CHECKPOINT_DIR
    args.engines_measured = list(args.engines)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(["python", "benchmarks/latency.py", *(sys.argv[1:] if argv is None else argv)])
    progress = not args.no_progress
    log = (lambda msg: tqdm.write(msg)) if progress else print
    cache, paths, base = run_setup(args, log)
    os.environ["PRUNEKIT_CACHE"] = str(cache.directory)  # latency tables live beside the rows that used them
    rows, round_rows, dense_rows = [], [], {}
    for model_name in args.models:
        dense, _, s = model_settings(paths[model_name], base)
        sdict = {**s.to_dict(), "grid": args.grid, "min_run_time": args.min_run_time,
                 "measure_time": args.measure_time, "engines": args.engines, "search_steps": args.search_steps,
                 **({"corrections": args.corrections} if args.corrections != 2 else {})}
        data = prunekit.load_dataset(s.data)
        dense_rows[model_name] = cache.get(f"{model_name}__dense", sdict)
        if dense_rows[model_name] is None:
            if args.cached_only:
                del dense_rows[model_name]
                continue
            dense_rows[model_name] = dense_summary(dense, data, s)
            cache.put(f"{model_name}__dense", sdict, dense_rows[model_name])

        def cached(key: str, run, *run_args, announce: str = "", sdict=sdict) -> dict[str, Any] | None:
            if args.cached_only:
                return cache.get(key, sdict)
            return cache.get_or_run(key, sdict, run, *run_args, announce=announce)

        for speedup in args.speedups:
            for batch in args.batches:
                for engine in args.engines:
                    for criterion in args.criteria:
                        where = f"{model_name}__{engine}__b{batch}__x{speedup:g}__{criterion}"
                        lat = cached(f"{where}__latency", latency_row, model_name, criterion, engine, batch, speedup,
                                     dense, data, s, dense_rows[model_name], args, progress,
                                     announce=f"{where} latency: measured {{measured_speedup:.2f}}x, test acc "
                                              "{test_acc:.4f}")
                        if lat is None or "infeasible" in lat:
                            rows += [lat] if lat is not None else []
                            continue
                        flo = cached(f"{where}__flops", flops_row, model_name, criterion, engine, batch, speedup,
                                     dense, data, s, dense_rows[model_name], lat, args, progress,
                                     announce=f"{where} flops x{{flops_factor:.2f}}: measured "
                                              "{measured_speedup:.2f}x, test acc {test_acc:.4f}")
                        rows += [lat] + ([flo] if flo is not None else [])
        for factor in args.round_factors:
            for r in ROUNDINGS if not args.quick else (1, 8):
                row = cached(f"{model_name}__round__x{factor:g}__r{r}", rounding_row, model_name, factor, r, dense,
                             data, s, dense_rows[model_name], args,
                             sdict={**sdict, "batches": args.batches})  # a row holds every engine and batch
                round_rows += [row] if row is not None else []
    targets, rounding = target_table(rows, dense_rows) + "\n\n" + goals(rows), rounding_table(round_rows)
    write_json(args.out / "latency.json", {"command": command, "commit": git_commit(), "dense": dense_rows,
                                           "rows": rows, "rounding": round_rows})
    write_text(args.out / "latency.md", f"# Latency targets\n\n`{command}`\n\n{__doc__}\n\n## Equal measured speed\n\n"
                                        f"{targets}\n\n## Rounding kept widths\n\n{rounding}\n")
    print(targets, "\n", rounding, sep="\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
