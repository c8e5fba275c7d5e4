"""ADMM-NN-S on the dense Fashion-MNIST LeNets: how far progressive non-structured pruning goes within 1 point of
accuracy, against iterative magnitude pruning (IMP) at the same epochs, and what joint quantization does to the
storage once indices and scales are counted.

For LeNet-5 and LeNet-300-100 (committed checkpoints), both rows start from the dense weights and prune
progressively through the stages ``--rates`` (default 10x -> 20x -> 50x -> 100x), keeping every earlier stage's zeros
(``prunekit.prune_`` with ``prunekit.ADMMConfig(stages=...)``):

* ``admm``: every stage is ``--admm-epochs`` of ADMM (Z/U every ``--update-every`` steps, rho rising from ``--rho``
  to ``--rho-max``), the hard projection and ``--retrain-epochs`` of masked retraining;
* ``imp``: the same stages with no ADMM epochs: magnitude pruning to the stage's rate and masked retraining for
  the same ``admm + retrain`` epochs, so both rows spend the same epochs at every rate.

Both use the same per-layer allocation (``--allocation``, default ``sensitivity``: each layer's validation loss when
it alone is pruned decides its share). Every stage's model is read back from the run's phases
(``prunekit.planning.schedule.Phases.saved``) and measured; the accuracy is the test accuracy of the stage's
best-on-validation retraining epoch.

Joint quantization (``--quant``, default 3 bits): from the ADMM stage with the highest rate whose validation accuracy
is within ``--max-loss`` points of the dense network's, ``--quant-epochs`` of ADMM towards the levels, then
progressive partial quantization (one retraining epoch per step).

Then the structured vs non-structured verdict (``--verdict``, on by default) for LeNet-5 (10x fewer weights) and
ResNet-20 (4x fewer FLOPs): group ADMM (whole coupled channels, removed physically) at that target, unstructured
ADMM keeping the same number of weights, and ``prunekit compare`` of both against the dense network (accuracy,
storage, latency of dense and sparse kernels, break-even sparsity), written to ``<out>/verdict-<model>/``. ResNet-20
trains as the structural benchmarks fine-tune (SGD lr 0.01, crop+flip, 1 ADMM + 1 retraining epoch: the two epochs
the curvature benchmark's rows get).

Storage: exact bits of the best format (``prunekit.measurement.formats``: dense, CSR, relative indexing with 5-bit gaps,
bitmap), weights + indices + scales, every other parameter as float32; compression = dense float32 bits / that.

    python benchmarks/admm.py --verdict                        # LeNet-5 and LeNet-300-100, 10 -> 20 -> 50 -> 100x
    python benchmarks/admm.py --quick --out /tmp/q             # about a minute: digits, small LeNet-5, 2 stages
    python benchmarks/admm.py --models --verdict lenet5 resnet20   # only the verdict (run it on an idle machine)

Every finished row is cached in ``<out>/cache`` and every finished phase of a row in ``<out>/runs``; an interrupted
run resumes.
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
from prunekit.planning.schedule import Phases

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "admm"
VERDICT_MODELS = ("lenet5", "resnet20")
VERDICT_TARGETS = {"lenet5": ("params", 0.1), "resnet20": ("flops", 0.25)}
# ResNet-20 trains as the structural benchmarks fine-tune (the LeNets: --lr, no augmentation)
VERDICT_TRAIN = {"resnet20": (0.01, prunekit.Augment.CROP_FLIP)}


ROW_KINDS = ("admm", "imp")  # the rows: ADMM, and iterative magnitude pruning at the same epochs


def staged_config(kind: str, args) -> prunekit.ADMMConfig:
    """The row's config: ADMM, or IMP (no ADMM epochs, the same epochs of masked retraining), through the stages."""
    schedule = {"target": prunekit.Target("params", 1 / args.rates[-1]), "stages": {"rates": tuple(args.rates[:-1])},
                "allocation": args.allocation}
    if kind == "imp":
        return prunekit.ADMMConfig(**schedule, admm_epochs=0, retrain_epochs=args.admm_epochs + args.retrain_epochs)
    return prunekit.ADMMConfig(**schedule, rho=args.rho, rho_max=args.rho_max, update_every=args.update_every,
                               admm_epochs=args.admm_epochs, retrain_epochs=args.retrain_epochs)


def context(args, folder: Path | None) -> prunekit.RunContext:
    return prunekit.RunContext(train=prunekit.TrainConfig(epochs=1, lr=args.lr, batch_size=128,
                                                          augment=prunekit.Augment.NONE, seed=0),
                               seed=0, progress=False, log=quiet, folder=folder,
                               resume=folder is not None and (folder / "run.json").is_file())


def measure(net, data, record, dense_bits: int) -> dict[str, Any]:
    net.eval()
    storage = encoding_storage(net, record.encoding, dense_bits)
    return {"val_acc": prunekit.evaluate(net, data.val)["acc"], "test_acc": prunekit.evaluate(net, data.test)["acc"],
            "storage_bits": storage["bits"], "best_format": storage["best"],
            "compression": storage["compression"][storage["best"]]}


def run_staged(dense, data, kind: str, args, folder: Path) -> dict[str, Any]:
    """One row: the stages on a copy of ``dense``; every stage's model measured from the run's saved phases."""
    torch.manual_seed(0)
    net = copy.deepcopy(dense).train()
    config = staged_config(kind, args)
    record = prunekit.prune_(net, config, data, context(args, folder))
    dense_bits = 32 * sum(p.numel() for p in dense.parameters())
    phases = Phases(folder / "phases")
    stages = []
    epochs = 0
    for i, summary in enumerate(record.results["stages"]):
        epochs += config.admm_epochs + config.retrain_epochs
        net.load_state_dict(phases.saved(f"stage-{i + 1}-retrain")["model"])
        stages.append({"rate": 1 / summary["keep_target"], "kept_fraction": summary["kept_fraction"],
                       "epochs": epochs, "removed_energy": summary["removed_energy"],
                       "converged": summary["converged"], **measure(net, data, record, dense_bits)})
    return {"kind": kind, "config": config.to_dict(), "stages": stages,
            "residuals": record.results["residuals"]}


def run_quant(dense, data, stage_state: dict[str, torch.Tensor], kept: float, quant: str, args) -> dict[str, Any]:
    """ADMM quantization of a pruned stage's model (its zeros kept by the same projection)."""
    torch.manual_seed(0)
    net = copy.deepcopy(dense).train()
    net.load_state_dict(stage_state)
    config = prunekit.ADMMConfig(target=prunekit.Target("params", kept), quant=quant, rho=args.rho,
                                 rho_max=args.rho_max, update_every=args.update_every,
                                 admm_epochs=args.quant_epochs, retrain_epochs=0)
    record = prunekit.prune_(net, config, data, context(args, None))
    row = measure(net, data, record, 32 * sum(p.numel() for p in dense.parameters()))
    return {"kind": "admm", "quant": quant, "kept_fraction": record.results["kept_fraction"], **row}


def table(model: str, dense_acc: float, admm: dict[str, Any], imp: dict[str, Any],
          quant_rows: list[dict[str, Any]]) -> str:
    lines = [f"**{model}** (dense test accuracy {100 * dense_acc:.2f}%)", "",
             "| rate | epochs | ADMM test acc % | IMP test acc % | ADMM - IMP pt | ADMM loss pt | ADMM residual energy "
             "| storage (format) |", "|---|---|---|---|---|---|---|---|"]
    for a, m in zip(admm["stages"], imp["stages"]):
        lines.append(f"| {a['rate']:g}x | {a['epochs']} | {100 * a['test_acc']:.2f} | {100 * m['test_acc']:.2f} | "
                     f"{100 * (a['test_acc'] - m['test_acc']):+.2f} | {100 * (dense_acc - a['test_acc']):+.2f} | "
                     f"{a['removed_energy']:.4f} | {a['compression']:.1f}x ({a['best_format']}) |")
    for q in quant_rows:
        lines.append(f"| {q['rate']:g}x + {q['quant']} | +{q['extra_epochs']} | {100 * q['test_acc']:.2f} | - | - | "
                     f"{100 * (dense_acc - q['test_acc']):+.2f} | - | {q['compression']:.1f}x ({q['best_format']}) |")
    return "\n".join(lines)


def readme_table(payload: dict[str, Any]) -> str:
    """The README's table: ADMM and IMP per stage, and the quantized rows, for every model."""
    return "\n\n".join(table(name, m["dense_test_acc"], m["admm"], m["imp"], m["quant"])
                        for name, m in payload["models"].items())


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
                "rho_max": args.rho_max, "update_every": args.update_every, "train": train.to_dict(),
                "target": [metric, keep]}
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
            config = prunekit.ADMMConfig(pattern=pattern, target=target, rho=args.rho, rho_max=args.rho_max,
                                         update_every=args.update_every, admm_epochs=args.verdict_epochs,
                                         retrain_epochs=args.verdict_epochs)
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


def model_rows(model_name: str, checkpoint: Path, cache: RowCache, args) -> dict[str, Any]:
    """The ADMM and IMP rows and the quantized rows of one model (each cached; the staged rows resume by phase)."""
    dense, _, data_cfg = load_dense(None, checkpoint, None)
    data = prunekit.load_dataset(data_cfg)
    dense_val, dense_test = (prunekit.evaluate(dense, split)["acc"] for split in (data.val, data.test))
    settings = {"checkpoint_sha256": sha256(checkpoint), "lr": args.lr,
                **{kind: staged_config(kind, args).to_dict() for kind in ROW_KINDS}}
    rows = {}
    for kind in ROW_KINDS:
        key = f"{model_name}__{kind}__staged"
        rows[kind] = cache.get_or_run(key, settings, run_staged, dense, data, kind, args, args.out / "runs" / key,
                                      announce=f"{model_name} {kind} stages done")
    # the highest ADMM stage within the loss on validation (none within: the first)
    within = [i for i, st in enumerate(rows["admm"]["stages"]) if 100 * (dense_val - st["val_acc"]) <= args.max_loss]
    best = max(within, default=0)
    stage = rows["admm"]["stages"][best]
    quant_rows = []
    for quant in args.quant:
        def quantized(quant: str = quant) -> dict[str, Any]:
            phases = Phases(args.out / "runs" / f"{model_name}__admm__staged" / "phases")
            saved = phases.saved(f"stage-{best + 1}-retrain")
            if saved is None:
                raise SystemExit(f"admm.py: the phases of {model_name}'s ADMM row are gone; delete "
                                 f"{cache.path(f'{model_name}__admm__staged')} to run it again")
            row = run_quant(dense, data, saved["model"], stage["kept_fraction"], quant, args)
            return {**row, "rate": stage["rate"], "extra_epochs": 2 * args.quant_epochs + 4}

        quant_rows.append(cache.get_or_run(
            f"{model_name}__admm__x{stage['rate']:g}__{quant.replace('=', '')}", {**settings, "quant_epochs":
                                                                                   args.quant_epochs}, quantized,
            announce=f"{model_name} ADMM x{stage['rate']:g} {quant}: test acc {{test_acc:.4f}}, storage "
                     "{compression:.1f}x ({best_format})"))
    return {"dense_test_acc": dense_test, "dense_val_acc": dense_val, "highest_rate_within_loss":
            stage["rate"] if within else None, "admm": rows["admm"], "imp": rows["imp"], "quant": quant_rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="admm.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="*", default=None, choices=sorted(LENETS),
                   help="models of the pruning-rate rows (default: both LeNets; none: skip)")
    p.add_argument("--rates", nargs="+", type=float, default=None,
                   help="rising pruning rates of the stages, the last the target (default 10 20 50 100)")
    p.add_argument("--admm-epochs", type=int, default=4, help="ADMM epochs per stage (IMP: retraining instead)")
    p.add_argument("--retrain-epochs", type=int, default=4, help="masked retraining epochs per stage")
    p.add_argument("--allocation", default="sensitivity", choices=["global", "uniform", "sensitivity"])
    p.add_argument("--rho", type=float, default=1e-2)
    p.add_argument("--rho-max", type=float, default=100.0)
    p.add_argument("--update-every", type=int, default=50)
    p.add_argument("--quant", nargs="*", default=["bits=3"], help="joint quantizations of the best stage")
    p.add_argument("--quant-epochs", type=int, default=2, help="ADMM epochs of the quantized rows")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--verdict", nargs="*", default=None, choices=sorted(VERDICT_MODELS),
                   help="models of the structured vs non-structured verdict (default: lenet5 resnet20; none: skip)")
    p.add_argument("--verdict-epochs", type=int, default=1, help="ADMM and retraining epochs of each verdict variant")
    p.add_argument("--max-loss", type=float, default=1.0,
                   help="validation accuracy points allowed for the stage that is quantized")
    p.add_argument("--checkpoint-dir", type=Path, default=CHECKPOINT_DIR)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.models = ["lenet5"] if args.models is None else args.models
        args.rates = args.rates or [5.0, 10.0]
        args.admm_epochs, args.retrain_epochs, args.quant_epochs, args.update_every = 1, 1, 1, 5
        args.verdict = ["lenet5"] if args.verdict is None else args.verdict
        torch.set_num_threads(1)
    args.verdict = sorted(VERDICT_MODELS) if args.verdict is None else args.verdict
    args.models = list(LENETS) if args.models is None else args.models
    args.rates = args.rates or [10.0, 20.0, 50.0, 100.0]
    if any(not r > 1 for r in args.rates) or any(a >= b for a, b in zip(args.rates, args.rates[1:])):
        p.error(f"--rates must rise and be > 1 (10 keeps a tenth of the weights), got {args.rates}")
    command = shlex.join(["python", "benchmarks/admm.py", *(sys.argv[1:] if argv is None else argv)])
    cache = RowCache(args.out / "cache")

    def checkpoint_of(model_name: str, accepted: tuple[str, ...]) -> Path:
        if args.quick:
            return quick_dense(cache.directory, "lenet5")
        return checkpoint_paths([model_name], args.checkpoint_dir, accepted)[model_name]

    payload: dict[str, Any] = {"command": command, "models": {}}
    for model_name in args.models:
        payload["models"][model_name] = model_rows(model_name, checkpoint_of(model_name, LENETS), cache, args)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.verdict:
        verdicts = {}
        for model_name in args.verdict:
            verdicts[model_name] = run_verdict(model_name, checkpoint_of(model_name, VERDICT_MODELS), cache, args,
                                               args.quick)
        vmd = ["# Structured vs non-structured pruning on this CPU" + (" (quick smoke run)" if args.quick else ""),
               "", "Made by (from the repository root):", "", f"    {command}", "",
               f"Each variant: {args.verdict_epochs} ADMM epoch(s) (rho {args.rho:g} -> {args.rho_max:g}, Z/U every "
               f"{args.update_every} steps) + {args.verdict_epochs} retraining epoch(s) from the dense checkpoint; "
               f"latency at batch 64, {torch.get_num_threads()} thread(s), medians.", ""]
        vmd += [verdict_markdown(m, r) for m, r in verdicts.items()]
        write_text(args.out / "verdict.md", "\n".join(vmd))
        print("\n".join(vmd))
    if not args.models:
        return 0
    write_json(args.out / "admm.json", payload)
    md = ["# ADMM-NN-S on the LeNets" + (" (quick smoke run)" if args.quick else ""), "",
          "Made by (from the repository root):", "", f"    {command}", "",
          f"Stages {' -> '.join(f'{r:g}x' for r in args.rates)}, {args.allocation} allocation, SGD lr {args.lr}. ADMM: "
          f"{args.admm_epochs} ADMM epoch(s) per stage (Z/U every {args.update_every} steps, rho {args.rho:g} -> "
          f"{args.rho_max:g}) + {args.retrain_epochs} masked retraining epoch(s); IMP: magnitude pruning + "
          f"{args.admm_epochs + args.retrain_epochs} retraining epochs per stage. Epochs are cumulative; residual "
          "energy: what the hard projection removed after ADMM (converged under 0.01). Quantized rows: the highest "
          f"ADMM stage within {args.max_loss:g} validation point(s), {args.quant_epochs} ADMM epochs towards the "
          "levels and progressive quantization.", "", readme_table(payload), ""]
    write_text(args.out / "admm.md", "\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
