"""Curvature-aware pruning on the dense Fashion-MNIST baselines: EigenDamage and its baselines (C-OBD, C-OBS,
Kron-OBD, Kron-OBS) against the best structural criterion and Torch-Pruning's best importance.

Every row starts from the same committed dense checkpoint and gets the same fine-tuning budget
(``--finetune-epochs`` epochs in total, ``prunekit.fit`` with prunekit's fine-tuning default: SGD lr 0.01, warm-up
over 15% of the steps then cosine, batch 128, crop+flip, seed 0). Every row is run at equal FLOPs and at equal
parameters (``--targets flops params``: the factor divides the FLOPs, or the parameters, and the table reports the
other reduction beside the accuracy), since EigenDamage's bottlenecks remove parameters much faster than FLOPs:

* one-shot: prune to 1/factor of the target metric (``prunekit.prune_`` with the method's registered config),
  BatchNorm re-estimated on 512 training images, then all epochs;
* iterative (``--rounds`` rounds, prunekit methods only): each round keeps ``factor ** (-1/rounds)`` of the metric
  and fine-tunes ``epochs / rounds`` epochs (EigenDamage re-collects statistics on the cores and merges rotations);
* Torch-Pruning: its own progressive recipe (the one ``benchmarks/structured.py`` runs, in ``benchmarks/common.py``),
  stepped until its own counter shows the MAC or parameter reduction, BatchNorm re-estimated the same way, then
  all epochs; ``--tp-best-from`` picks each model's importance by validation accuracy in the structured results.

Curvature statistics: true Fisher on ``--fisher-batches`` batches of 64, ``--damping`` (default prunekit's, chosen
by ``benchmarks/damping.py``; relative to the factors' mean eigenvalues). The table reports test accuracy
(best-on-validation epoch), params, FLOPs, CPU latency at batch 64 (dense and pruned alternated in one process),
and the time spent collecting statistics and decomposing as a fraction of one training epoch of the dense network
(goal <= 0.25).

    python benchmarks/eigendamage.py                       # ResNet-20 and VGG-11, x4 x8, one-shot and iterative
    python benchmarks/eigendamage.py --factors 8 --schedules one-shot --finetune-epochs 8 \
        --methods eigendamage kron-obs c-obs l1 --fisher-batches 64 \
        --tp-best-from benchmarks/results/structured/structured.json \
        --out benchmarks/results/eigendamage-long          # the long budget: 8 epochs at x8
    python benchmarks/eigendamage.py --quick --out /tmp/q  # about a minute: digits, a small ResNet-20, x4

Every finished row is cached in ``<out>/cache``; an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import prunekit
from common import (
    CHECKPOINT_DIR,
    ROOT,
    STRUCTURAL,
    TARGET_KINDS,
    TP_IMPORTANCES,
    config_fields,
    dense_pruned_latency,
    dense_summary,
    finish_row,
    fmt_acc,
    git_commit,
    model_settings,
    plot_accuracy_vs_flops,
    prune_torch_pruning,
    quiet,
    row_key,
    run_setup,
    structural_config,
    warmup_text,
    write_json,
    write_text,
)
from prunekit.recovery.batchnorm import recalibrate_batchnorm_

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "eigendamage"
CURVATURE_METHODS = ("eigendamage", "c-obd", "c-obs", "kron-obd", "kron-obs")
# The best structural criterion and Torch-Pruning importance of benchmarks/structured.py on ResNet-20 at x4/x8.
BEST_STRUCTURAL, BEST_TP = "l1", "bn"
QUICK = {"models": ["resnet20"], "factors": [4.0], "methods": ["eigendamage", "kron-obs"], "schedules": ["one-shot"],
         "targets": list(TARGET_KINDS)}
SCHEDULES = ("one-shot", "iterative")


def collects_statistics(method: str) -> bool:
    """Whether the registered method's config has curvature settings (its rows report statistics time)."""
    return "curvature" in config_fields(method)


def prune_ours(dense, data, method: str, factor: float, schedule: str, rounds: int, s,
               curvature: prunekit.FisherSettings, progress: bool, kind: str = "flops"):
    """Prune a copy with prunekit (``prunekit.prune_``, one call per round, each keeping ``factor ** (-1/k)`` of
    the FLOPs, or of the parameters with ``kind="params"``); iterative rounds fine-tune in between. Returns (net,
    info, last-round settings)."""
    k = rounds if schedule == "iterative" else 1
    epochs_per_round = s.finetune.epochs // k
    info: dict[str, Any] = {"rounds": k, "seconds_statistics": 0.0, "seconds_finetune_between_rounds": 0.0,
                            "architecture_changes": []}
    torch.manual_seed(s.seed)
    net = copy.deepcopy(dense).train()
    for r in range(1, k + 1):
        config = structural_config(method, factor ** (-1.0 / k), s, kind, curvature=curvature)
        context = prunekit.RunContext(seed=s.seed + r - 1, progress=False, log=quiet)
        record = prunekit.prune_(net, config, data, context)
        info["seconds_statistics"] += record.rounds[-1]["seconds_scoring"]
        info["architecture_changes"] += record.changes
        if r < k:
            t0 = time.perf_counter()
            prunekit.fit(net, data, replace(s.finetune, epochs=epochs_per_round), progress=progress)
            info["seconds_finetune_between_rounds"] += time.perf_counter() - t0
    last = replace(s, finetune=replace(s.finetune, epochs=s.finetune.epochs - epochs_per_round * (k - 1)))
    return net, info, last


def run_model(model_name: str, checkpoint: Path, jobs: list[tuple[str, str, str, str]], factors: list[float],
              base, args, cache, bar: tqdm, progress: bool, log) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The dense row and every (tool, method, schedule, target kind, factor) row of one model, cached."""
    dense, _, settings = model_settings(checkpoint, base)
    curvature = prunekit.FisherSettings(fisher_batches=args.fisher_batches, damping=args.damping)
    sdict = {**settings.to_dict(), "fisher_batches": args.fisher_batches, "damping": args.damping,
             "rounds": args.rounds}
    dense_row = cache.get(f"{model_name}__dense", sdict)
    found = {(*job, f): cache.get(row_cache_key(model_name, *job, f), sdict) for job in jobs for f in factors}
    rows = [r for r in found.values() if r is not None]
    bar.update(len(rows))
    if args.cached_only and len(rows) < len(found):
        log(f"{model_name}: {len(found) - len(rows)} row(s) not run yet, left out (--cached-only)")
    if dense_row is not None and (len(rows) == len(found) or args.cached_only) and not args.remeasure_latency:
        return {**dense_row, "settings": sdict}, rows
    data = prunekit.load_dataset(settings.data)
    if dense_row is None:
        dense_row = dense_summary(dense, data, settings)
        cache.put(f"{model_name}__dense", sdict, dense_row)
    for tool, method, schedule, kind in jobs:
        todo = [] if args.cached_only else [f for f in factors if found[(tool, method, schedule, kind, f)] is None]
        if not todo:
            continue
        if tool == "torch-pruning":
            trajectory = prune_torch_pruning(dense, data, method, todo, settings, progress, kind)
        for factor in todo:
            bar.set_postfix_str(f"{model_name} {method} {schedule} {kind} x{factor:g}")
            t0 = time.perf_counter()
            if tool == "prunekit":
                net, info, last = prune_ours(dense, data, method, factor, schedule, args.rounds, settings,
                                             curvature, progress, kind)
                seconds = time.perf_counter() - t0 - info["seconds_finetune_between_rounds"]
            else:
                net, info = trajectory.pop(factor)
                recalibrate_batchnorm_(net, data, settings.bn_recalibration_images)
                seconds, last = info["seconds"] + time.perf_counter() - t0, settings
            row = finish_row(model_name, tool, method, factor, dense, net, data, last, dense_row, seconds, info,
                             progress, kind)
            if "epoch_seconds" not in dense_row:
                dense_row["epoch_seconds"] = dense_epoch_seconds(dense, data, settings, progress)
                cache.put(f"{model_name}__dense", sdict, dense_row)
            row.update(schedule=schedule, seconds_statistics=info.get("seconds_statistics", seconds),
                       statistics_per_epoch=info.get("seconds_statistics", seconds) / dense_row["epoch_seconds"])
            cache.put(row_cache_key(model_name, tool, method, schedule, kind, factor), sdict, row)
            rows.append(row)
            log(f"{model_name} {method:>11} {schedule:>9} {kind} x{factor:g}: FLOPs {row['flops_reduction']:.2f}x, "
                f"params {row['params_reduction']:.2f}x, test acc {row['test_acc_pruned']:.4f} -> "
                f"{row['test_acc']:.4f}, statistics {row['statistics_per_epoch']:.2f} epoch")
            bar.update(1)
    if args.remeasure_latency:
        remeasure_latency(model_name, checkpoint, rows, settings, cache, sdict, curvature, log)
        dense_row = cache.get(f"{model_name}__dense", sdict)
    return {**dense_row, "settings": sdict}, rows


def target_of(row: dict[str, Any]) -> str:
    """What a row's factor reduced ("flops" for rows made before parameter targets existed)."""
    return row.get("target", "flops")


def row_cache_key(model: str, tool: str, method: str, schedule: str, kind: str, factor: float) -> str:
    return f"{row_key(model, tool, method, factor, kind)}__{schedule}"


def best_tp_criterion(path: Path, model: str, factor: float) -> str:
    """The Torch-Pruning importance with the best seed-0 validation accuracy for ``model`` at ``factor`` in a
    structured.json (never chosen on test)."""
    try:
        rows = json.loads(Path(path).read_text())["rows"]
    except (OSError, ValueError, KeyError) as exc:
        raise SystemExit(f"eigendamage.py: error: cannot read Torch-Pruning rows from {path}: {exc}") from None
    mine = [r for r in rows if (r["model"], r["tool"], r["factor"], r.get("seed", 0))
            == (model, "torch-pruning", factor, 0)]
    if not mine:
        raise SystemExit(f"eigendamage.py: error: {path} has no Torch-Pruning row of {model} at x{factor:g}")
    return max(mine, key=lambda r: r["val_acc"])["method"]


def dense_epoch_seconds(dense, data, settings, progress: bool = False) -> float:
    """Seconds of one training epoch of the dense network (what statistics time is compared with)."""
    net = copy.deepcopy(dense).train()
    t0 = time.perf_counter()
    prunekit.fit(net, data, replace(settings.finetune, epochs=1), progress=progress)
    return time.perf_counter() - t0


def remeasure_latency(model_name: str, checkpoint: Path, rows: list[dict[str, Any]], settings, cache,
                      sdict: dict[str, Any], curvature: prunekit.FisherSettings, log) -> None:
    """Time every row again (on an idle machine): latency, and for one-shot rows the statistics time.

    One-shot prunekit rows and Torch-Pruning rows are re-pruned (deterministic); an iterative row's network is
    rebuilt from its recorded architecture changes (latency does not depend on the weights). Parameters and FLOPs
    are checked against the row first. Statistics time is compared with one training epoch of the dense network,
    timed again here."""
    from prunekit.persistence.architecture import build_base, input_shape_of, replay_changes_

    dense, base, _ = model_settings(checkpoint, settings)
    dense.eval()
    shape = input_shape_of(base)
    data = prunekit.load_dataset(settings.data)
    epoch_seconds = dense_epoch_seconds(dense, data, settings)
    trajectories: dict[str, Any] = {}
    for r in rows:
        if r["tool"] == "prunekit":
            if r["schedule"] == "one-shot":  # re-pruning also re-times statistics and decomposition
                net, info, _ = prune_ours(dense, data, r["method"], r["factor"], "one-shot", 1, settings,
                                          curvature, False, target_of(r))
                r["seconds_statistics"] = info["seconds_statistics"]
            elif "architecture_changes" in r["tool_info"]:
                net = build_base(base)
                replay_changes_(net, r["tool_info"]["architecture_changes"], shape)
            else:
                log(f"{model_name} {r['method']} {r['schedule']} x{r['factor']:g}: no recorded architecture, "
                    "latency left as it was (delete the row to run it again)")
                continue
        else:
            path = (r["method"], target_of(r))
            if path not in trajectories:
                factors = sorted(x["factor"] for x in rows if x["tool"] == r["tool"] and (x["method"], target_of(x))
                                 == path)
                trajectories[path] = prune_torch_pruning(dense, data, r["method"], factors, settings, False, path[1])
            net = trajectories[path][r["factor"]][0]
        net.eval()
        got = (prunekit.count_params(net), prunekit.count_flops(net, (1, *shape)))
        if got != (r["params"], r["flops"]):
            raise SystemExit(f"eigendamage.py: error: rebuilding {model_name} {r['method']} {r['schedule']} "
                             f"x{r['factor']:g} gave {got} params/FLOPs, the row has {(r['params'], r['flops'])}")
        lat_dense, lat_pruned = dense_pruned_latency(dense, net, shape, settings)
        if "seconds_statistics" in r:
            r["statistics_per_epoch"] = r["seconds_statistics"] / epoch_seconds
        r.update(latency_dense_ms=lat_dense, latency_pruned_ms=lat_pruned, latency_speedup=lat_dense / lat_pruned,
                 speedup_per_flops_reduction=lat_dense / lat_pruned / r["flops_reduction"],
                 latency_threads=torch.get_num_threads(), latency_remeasured=True)
        cache.put(row_cache_key(model_name, r["tool"], r["method"], r["schedule"], target_of(r), r["factor"]), sdict,
                  r)
        log(f"{model_name} {r['method']:>11} {r['schedule']:>9} x{r['factor']:g}: speedup {r['latency_speedup']:.2f}x")
    dense_row = cache.get(f"{model_name}__dense", sdict)
    if dense_row is not None:  # the dense latency of this pass: the median of its paired measurements
        timed = [r["latency_dense_ms"] for r in rows if r.get("latency_remeasured")]
        dense_row.update(epoch_seconds=epoch_seconds,
                         latency_ms=statistics.median(timed) if timed else dense_row["latency_ms"])
        cache.put(f"{model_name}__dense", sdict, dense_row)


def summary_table(rows: list[dict[str, Any]]) -> str:
    """Per model, schedule and method: fine-tuned test accuracy at each FLOPs target with the parameter reduction
    it gave, and at each parameter target with the FLOPs reduction it gave (the table the README shows)."""
    columns = sorted({(target_of(r), r["factor"]) for r in rows})
    other = {"flops": ("params", "params_reduction"), "params": ("FLOPs", "flops_reduction")}
    header = ["model", "schedule", "method",
              *[f"x{f:g} {'FLOPs' if k == 'flops' else 'params'}: test acc % ({other[k][0]} red.)"
                for k, f in columns]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    seen = dict.fromkeys((r["model"], r["schedule"], r["tool"], r["method"]) for r in rows)
    by = {(r["model"], r["schedule"], r["tool"], r["method"], target_of(r), r["factor"]): r for r in rows}
    for model, schedule, tool, method in seen:
        name = method if tool == "prunekit" else f"Torch-Pruning {method}"
        cells = []
        for kind, f in columns:
            r = by.get((model, schedule, tool, method, kind, f))
            cells.append("-" if r is None else f"{100 * r['test_acc']:.2f} ({r[other[kind][1]]:.1f}x)")
        lines.append(f"| {model} | {schedule} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def results_table(rows: list[dict[str, Any]], dense: dict[str, dict[str, Any]]) -> str:
    header = ["model", "method", "schedule", "target", "params", "params red.", "MFLOPs", "FLOPs red.",
              "latency b64 ms", "speedup", "statistics / epoch", "test acc after pruning %", "test acc fine-tuned %"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model, d in dense.items():
        lines.append(f"| {model} | dense | - | - | {d['params']:,} | 1.00x | {d['flops'] / 1e6:.2f} | 1.00x | "
                     f"{d['latency_ms']:.2f} | 1.00x | - | - | {fmt_acc(d['test_acc'])} |")
        for r in (r for r in rows if r["model"] == model):
            name = r["method"] if r["tool"] == "prunekit" else f"Torch-Pruning {r['method']}"
            stats = f"{r['statistics_per_epoch']:.2f}" if collects_statistics(r["method"]) else "-"
            lines.append(
                f"| {model} | {name} | {r['schedule']} | {target_of(r)} x{r['factor']:g} | {r['params']:,} | "
                f"{r['params_reduction']:.2f}x | {r['flops'] / 1e6:.2f} | {r['flops_reduction']:.2f}x | "
                f"{r['latency_pruned_ms']:.2f} | {r['latency_speedup']:.2f}x | {stats} | "
                f"{fmt_acc(r['test_acc_pruned'])} | {fmt_acc(r['test_acc'])} |")
    return "\n".join(lines)


def write_outputs(out: Path, command: str, rows, dense, quick: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    payload = {"command": command, "quick": quick, "git_commit": git_commit(), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "dense": dense, "rows": rows}
    write_json(out / "eigendamage.json", payload)
    plot_rows = [{**r, "tool": "prunekit" if r["schedule"] == "one-shot" else "torch-pruning",
                  "method": r["method"] if r["tool"] == "prunekit" else f"TP {r['method']}"} for r in rows]
    plot_accuracy_vs_flops(plot_rows, dense, out / "eigendamage_accuracy_vs_flops.png")
    s = next(iter(dense.values()))["settings"]
    ft = s["finetune"]
    text = [
        "# Curvature-aware pruning: EigenDamage and its baselines" + (" (quick smoke run)" if quick else ""),
        "", "Made by (from the repository root):", "", f"    {command}", "",
        *([f"and the latency (and, for one-shot rows, the statistics time) of "
           f"{sum(bool(r.get('latency_remeasured')) for r in rows)} of the {len(rows)} rows measured again on an "
           "idle machine by the same command with `--remeasure-latency`.", ""]
          if any(r.get("latency_remeasured") for r in rows) and "--remeasure-latency" not in command else []),
        f"torch {torch.__version__}, {s['threads']} CPU thread(s), data {s['data']['name']}. Every row: "
        f"{ft['epochs']} fine-tuning epoch(s) in total (iterative: {s['rounds']} rounds, the epochs split between "
        f"them), SGD lr {ft['lr']}, {warmup_text(ft)}{ft['schedule']}, batch {ft['batch_size']}, {ft['augment']}; "
        "test accuracy of the "
        f"best-on-validation epoch. Curvature: true Fisher on {s['fisher_batches']} batches of 64, damping "
        f"{s['damping']:g}. *statistics / epoch*: seconds spent collecting statistics and scoring/decomposing, "
        "over the seconds of one training epoch of the dense network (goal <= 0.25). Plot: solid lines one-shot, "
        "dashed iterative.",
        "", "## Summary", "", summary_table(rows), "", "## All rows", "", results_table(rows, dense), "",
        "![accuracy vs FLOPs](eigendamage_accuracy_vs_flops.png)",
    ]
    write_text(out / "eigendamage.md", "\n".join(text).rstrip() + "\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="eigendamage.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=None, help="default: resnet20 vgg11")
    p.add_argument("--factors", nargs="+", type=float, default=None, help="reduction targets (default 4 8)")
    p.add_argument("--targets", nargs="+", choices=TARGET_KINDS, default=None,
                   help="what the factors reduce: every row at equal FLOPs and at equal parameters (default both)")
    p.add_argument("--methods", nargs="*", default=None,
                   help=f"prunekit methods (default: {' '.join(CURVATURE_METHODS)} {BEST_STRUCTURAL})")
    p.add_argument("--tp-methods", nargs="*", default=None, help=f"Torch-Pruning importances (default: {BEST_TP})")
    p.add_argument("--tp-best-from", type=Path, default=None,
                   help="instead of --tp-methods, each model's Torch-Pruning importance with the best seed-0 "
                        "validation accuracy at the largest --factors in this structured.json "
                        "(benchmarks/structured.py's results)")
    p.add_argument("--schedules", nargs="+", choices=SCHEDULES, default=None)
    p.add_argument("--rounds", type=int, default=2, help="rounds of the iterative schedule")
    p.add_argument("--finetune-epochs", type=int, default=2, help="fine-tuning epochs per row, in total")
    p.add_argument("--fisher-batches", type=int, default=None,
                   help=f"K-FAC batches of 64 (default prunekit's, {prunekit.FisherSettings().fisher_batches}; "
                        "--quick: 8)")
    p.add_argument("--damping", type=float, default=prunekit.FisherSettings().damping,
                   help="Tikhonov damping of the OBS criteria (default: prunekit's, see benchmarks/damping.py)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N training images (smoke runs)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--checkpoint-dir", type=Path, default=CHECKPOINT_DIR)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--quick", action="store_true", help="about a minute: digits, a small resnet20, x4")
    p.add_argument("--remeasure-latency", action="store_true",
                   help="after the rows are done, time every row again (run on an idle machine)")
    p.add_argument("--cached-only", action="store_true",
                   help="write the tables from the finished rows only (an interrupted run, summarised now)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    defaults = {"models": ["resnet20", "vgg11"], "factors": [4.0, 8.0], "targets": list(TARGET_KINDS),
                "methods": [*CURVATURE_METHODS, BEST_STRUCTURAL], "schedules": list(SCHEDULES)}
    for name, default in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, QUICK[name] if args.quick else default)
    if args.tp_methods is None:
        args.tp_methods = [] if args.quick else [BEST_TP]
    bad = [m for m in args.methods if m not in (*CURVATURE_METHODS, *STRUCTURAL)]
    bad += [m for m in args.tp_methods if m not in TP_IMPORTANCES]
    if bad:
        p.error(f"unknown methods {bad}; --methods accepts {[*CURVATURE_METHODS, *STRUCTURAL]}, --tp-methods "
                f"accepts {list(TP_IMPORTANCES)}")
    if any(not f > 1 for f in args.factors):
        p.error(f"--factors must be > 1, got {args.factors}")
    if args.rounds < 2 or args.finetune_epochs < args.rounds:
        p.error(f"--rounds must be >= 2 and --finetune-epochs >= --rounds, got {args.rounds} and "
                f"{args.finetune_epochs}")
    if args.fisher_batches is None:
        args.fisher_batches = 8 if args.quick else prunekit.FisherSettings().fisher_batches
    if args.quick:
        args.threads = args.threads or 1
        args.finetune_epochs = min(args.finetune_epochs, 2)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(["python", "benchmarks/eigendamage.py", *(sys.argv[1:] if argv is None else argv)])
    progress = not args.no_progress
    log = (lambda msg: tqdm.write(msg)) if progress else print
    cache, paths, base = run_setup(args, log)
    ours = [("prunekit", m, sc, k) for k in args.targets for sc in args.schedules for m in args.methods]

    def jobs_for(model_name: str) -> list[tuple[str, str, str, str]]:
        tp = ([best_tp_criterion(args.tp_best_from, model_name, max(args.factors))] if args.tp_best_from
              else args.tp_methods)
        return ours + [("torch-pruning", m, "one-shot", k) for k in args.targets for m in tp]

    jobs = {model_name: jobs_for(model_name) for model_name in args.models}
    bar = tqdm(total=len(args.factors) * sum(map(len, jobs.values())), desc="rows", disable=not progress)
    rows, dense_rows = [], {}
    for model_name in args.models:
        dense_row, model_rows = run_model(model_name, paths[model_name], jobs[model_name], args.factors, base, args,
                                          cache, bar, progress, log)
        dense_rows[model_name] = {**dense_row, "checkpoint": str(paths[model_name])}
        rows += model_rows
    bar.close()
    order = {job: i for i, job in enumerate(dict.fromkeys(j for js in jobs.values() for j in js))}
    rows.sort(key=lambda r: (args.models.index(r["model"]), r["factor"], order[(r["tool"], r["method"],
                                                                                 r["schedule"], target_of(r))]))
    write_outputs(args.out, command, rows, dense_rows, args.quick)
    print(results_table(rows, dense_rows))
    print(f"\nwrote {args.out / 'eigendamage.md'}, eigendamage.json, eigendamage_accuracy_vs_flops.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
