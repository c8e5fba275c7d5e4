"""The methods the seed papers sit among, on the dense Fashion-MNIST baselines: SPP, IncReg and sDprun against
one-shot L1 and Torch-Pruning's growing regularization (``GrowingRegPruner``), at equal FLOPs and an equal epoch
budget; and DJPQ on LeNet-5, by accuracy against storage bits and bit operations.

Channel rows (``--models``, ``--factors``): every row starts from the same committed dense checkpoint and spends
``--budget`` epochs in total with prunekit's fine-tuning recipe (SGD lr 0.01, warm-up over 15% of the steps then
cosine, batch 128, crop+flip, seed 0), then test accuracy of the best-on-validation fine-tuning epoch:

* ``l1`` (the reference): one-shot to 1/factor of the FLOPs (global allocation, at most 90% of a group), BatchNorm
  re-estimated on 512 images, then all ``--budget`` epochs of fine-tuning; ``l1-uniform`` the same with the same
  fraction of every group (the allocation the training methods use, so that method and allocation are not
  confused);
* ``spp``, ``increg``, ``sdprun`` (``prunekit.prune_`` with the registered config): ``--train-epochs`` of the
  method's own training at the same recipe, removal to 1/factor of the FLOPs (the same fraction of every group, as
  the papers prune per layer), BatchNorm re-estimated, then the rest of the budget as fine-tuning;
* Torch-Pruning's ``GrowingRegPruner`` (installed version, ``MagnitudeImportance(p=2)``, ``reg`` 1e-5, its
  ``regularize()`` applied to the gradients between backward and the optimizer step, ``update_reg()`` every 10 steps
  as in the paper (Wang et al. 2021, arXiv 2012.09243), global ranking, at most 90% of a group): ``--train-epochs``
  of regularized training, then its own progressive steps until its counter shows the MAC reduction, BatchNorm
  re-estimated, the rest of the budget as fine-tuning. ``delta_reg`` is scaled to the budget as IncReg's amplitude
  is: the least important channel's factor reaches 1 (the paper's ceiling) half way through, where the paper's
  1e-4 per update would reach 0.004 in one epoch. In Torch-Pruning 1.6 ``regularize`` reaches conv/linear weights only
  (its BatchNorm branch adds to a copy of the gradient).

Each training row also reports the training loss (no augmentation) before the method's training and at its end:
sDprun's claim is that it stays in the valley SGD found.

DJPQ rows (``--djpq-bops``): the committed LeNet-5 trained ``--djpq-epochs`` epochs by ``prunekit.DJPQConfig`` at
each BOPs target (a fraction of the 8-bit network's), test accuracy at the end (no fine-tuning: it would leave the
learned grids), exact storage by the formats module and BOPs; the README puts them beside the ADMM and DPP joint
rows of ``benchmarks/results/admm`` and ``benchmarks/results/dpp``.

    python benchmarks/related.py --threads 1               # ResNet-20 and VGG-11, x4 x8; DJPQ on LeNet-5
    python benchmarks/related.py --quick --out /tmp/q      # about a minute: digits, a small ResNet-20, x2

Every finished row is cached in ``<out>/cache``; an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch_pruning as tp
from tqdm.auto import tqdm

import prunekit
from common import (
    CHECKPOINT_DIR,
    CHECKPOINTS,
    ROOT,
    dense_summary,
    finish_row,
    fmt_acc,
    git_commit,
    method_config,
    model_settings,
    prune_copy,
    quick_dense,
    row_key,
    run_setup,
    structural_config,
    write_json,
    write_text,
)
from prunekit.channels.graph import find_output_layers
from prunekit.measurement.formats import encoding_storage
from prunekit.recovery.batchnorm import recalibrate_batchnorm_
from prunekit.training import TrainHooks

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "related"
METHODS = ("spp", "increg", "sdprun")
TP_REG, TP_UPDATE_EVERY = 1e-5, 10


class _GrowingReg(TrainHooks):
    """Torch-Pruning's growing regularization inside ``prunekit.fit``: its ``regularize`` on the gradients before
    every optimizer step, ``update_reg`` every ``TP_UPDATE_EVERY`` steps."""

    def __init__(self, pruner) -> None:
        self.pruner = pruner

    def before_step(self, model) -> None:
        self.pruner.regularize(model)

    def after_step(self, model, optimizer, step: int) -> None:
        if (step + 1) % TP_UPDATE_EVERY == 0:
            self.pruner.update_reg()


def prune_growing_reg(dense, data, factor: float, s, train_epochs: int, progress: bool):
    """Torch-Pruning's GrowingRegPruner: regularized training, then progressive steps to the MAC reduction."""
    torch.manual_seed(s.seed)
    net = copy.deepcopy(dense).train()
    example = data.train[:2][0]
    modules = dict(net.named_modules())
    updates = max(1, train_epochs * -(-len(data.train) // s.finetune.batch_size) // TP_UPDATE_EVERY)
    delta_reg = 1.0 / max(1, updates // 2)  # the least important channel reaches 1 half way, as IncReg's factors
    pruner = tp.pruner.GrowingRegPruner(
        net, example, importance=tp.importance.MagnitudeImportance(p=2), reg=TP_REG, delta_reg=delta_reg,
        global_pruning=True, pruning_ratio=1.0, iterative_steps=s.tp_iterative_steps, max_pruning_ratio=s.max_per_layer,
        ignored_layers=[modules[n] for n in find_output_layers(net, example)])
    loss_before = prunekit.evaluate(net, data.train)["loss"]
    prunekit.fit(net, data, replace(s.finetune, epochs=train_epochs), progress=progress, hooks=_GrowingReg(pruner),
                 select_best=False)
    loss_after = prunekit.evaluate(net, data.train)["loss"]
    net.eval()
    base = tp.utils.count_ops_and_params(net, example[:1])[0]
    count = base
    while base / count < factor and pruner.current_step < pruner.iterative_steps:
        pruner.step()
        count = tp.utils.count_ops_and_params(net, example[:1])[0]
    net.zero_grad(set_to_none=True)
    recalibrate_batchnorm_(net, data, s.bn_recalibration_images)
    return net, {"tp_macs_reduction": base / count, "target_reached": base / count >= factor,
                 "train_loss_before": loss_before, "train_loss_after_training": loss_after, "delta_reg": delta_reg}


def _reference(allocation: str):
    """One-shot L1 with ``allocation``, then the whole budget as fine-tuning."""

    def run(dense, data, s, factor: float, args, progress: bool):
        config = structural_config("l1", 1 / factor, s)
        config = replace(config, allocation=replace(config.allocation, allocation=allocation))
        net, _ = prune_copy(dense, config, data, s.seed)
        return net, {}, s, "prunekit", 0

    return run


def _growing_reg(dense, data, s, factor: float, args, progress: bool):
    net, info = prune_growing_reg(dense, data, factor, s, args.train_epochs, progress)
    return net, info, _rest(s, args), "torch-pruning", args.train_epochs


def _trained(method: str):
    """A registered training method: its own epochs, then the rest of the budget as fine-tuning."""

    def run(dense, data, s, factor: float, args, progress: bool):
        config = method_config(method, target=prunekit.Target("flops", 1 / factor), epochs=args.train_epochs,
                               bn_images=s.bn_recalibration_images, finetune_epochs=0)
        net, record = prune_copy(dense, config, data, s.seed, train=replace(s.finetune, epochs=0))
        info = {k: v for k, v in record.results.items() if isinstance(v, (int, float, str)) or v is None}
        return net, info, _rest(s, args), "prunekit", args.train_epochs

    return run


def _rest(s, args):
    return replace(s, finetune=replace(s.finetune, epochs=args.budget - args.train_epochs))


ROWS = {"l1": _reference("global"), "l1-uniform": _reference("uniform"), "growing-reg": _growing_reg,
        **{m: _trained(m) for m in METHODS}}
TOOLS = {"growing-reg": "torch-pruning"}  # the cache key's tool; prunekit otherwise


def channel_row(model_name: str, method: str, factor: float, dense, data, s, dense_row, args, progress: bool):
    """One channel row (see the module docstring)."""
    t0 = time.perf_counter()
    net, info, last, tool, train_epochs = ROWS[method](dense, data, s, factor, args, progress)
    seconds = time.perf_counter() - t0
    row = finish_row(model_name, tool, method, factor, dense, net, data, last, dense_row, seconds, info, progress)
    row.update(budget=args.budget, train_epochs=train_epochs)
    return row


def djpq_row(dense, data, bops: float, epochs: int, seed: int, train) -> dict[str, Any]:
    """DJPQ at one BOPs target on the LeNet-5: accuracy, storage and BOPs."""
    t0 = time.perf_counter()
    net, record = prune_copy(dense, prunekit.DJPQConfig(bops=bops, epochs=epochs), data, seed, train=train)
    storage = encoding_storage(net, record.encoding, dense_bits=32 * prunekit.count_params(dense))
    return {"bops_target": bops, "epochs": epochs, "val_acc": record.val_acc_before_finetune,
            "test_acc": record.test_acc_before_finetune, "params": prunekit.count_params(net),
            "storage_bits": storage["bits"][storage["best"]], "storage_format": storage["best"],
            "compression": storage["compression"][storage["best"]], "bops": record.results["bops"],
            "layer_bits": record.results["layer_bits"], "seconds": time.perf_counter() - t0}


def channel_table(rows: list[dict[str, Any]], dense: dict[str, dict[str, Any]]) -> str:
    """Per model and factor: each method's FLOPs and params reduction, accuracy right after removal, test accuracy
    (best-on-validation epoch), training loss before and after the method's own training; the best on
    validation in bold."""
    names = {"l1": "L1 one-shot, global (reference)", "l1-uniform": "L1 one-shot, same fraction per group",
             "spp": "SPP", "increg": "IncReg", "sdprun": "sDprun", "growing-reg": "Torch-Pruning GrowingReg"}
    header = ["model", "FLOPs target", "method", "FLOPs", "params", "right after removal", "val acc", "test acc",
              "train loss before -> after the method's training"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (model, factor), group in _groups(rows).items():
        best = max(group, key=lambda r: r["val_acc"])
        for r in group:
            info = r.get("tool_info", {})
            loss = (f"{info['train_loss_before']:.3f} -> {info['train_loss_after_training']:.3f}"
                    if info.get("train_loss_before") is not None else "-")
            test = fmt_acc(r["test_acc"])
            lines.append(f"| {model} ({fmt_acc(dense[model]['test_acc'])}) | x{factor:g} | {names[r['method']]} | "
                         f"{r['flops_reduction']:.2f}x | {r['params_reduction']:.2f}x | "
                         f"{fmt_acc(r['test_acc_pruned'])} | "
                         f"{fmt_acc(r['val_acc'])} | {f'**{test}**' if r is best else test} | {loss} |")
    return "\n".join(lines)


def _groups(rows: list[dict[str, Any]]) -> dict[tuple[str, float], list[dict[str, Any]]]:
    out: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault((r["model"], r["factor"]), []).append(r)
    return out


def joint_references(results: Path = ROOT / "benchmarks" / "results") -> list[dict[str, Any]]:
    """The joint pruning + quantization rows of the ADMM and DPP benchmarks on the same LeNet-5 (read from their
    committed JSON), to stand beside DJPQ's."""
    import json

    out = []
    admm_path, dpp_path = results / "admm" / "admm.json", results / "dpp" / "dpp.json"
    if admm_path.is_file():
        for q in json.loads(admm_path.read_text())["models"]["lenet5"]["quant"]:
            out.append({"label": f"ADMM {q['rate']:g}x + {q['quant']} (ADMM table)", "test_acc": q["test_acc"],
                        "storage_bits": q["storage_bits"][q["best_format"]], "storage_format": q["best_format"],
                        "compression": q["compression"]})
    if dpp_path.is_file():
        ours = {"dpp"}  # prunekit's DPP rows (beside magnitude and the authors' recipe), with quantized weights
        for r in json.loads(dpp_path.read_text())["models"]["lenet5"]["rows"]:
            if r["method"] in ours and r["quant"] != "none":
                runs = sorted({f"{k}-of-{n}" for k, n in r["k_of_n"].values()})
                out.append({"label": f"DPP {'/'.join(runs)} + {r['quant']} (DPP table)", "test_acc": r["test_acc"]})
    return out


def djpq_table(rows: list[dict[str, Any]], dense: dict[str, Any], name: str = "LeNet-5",
               references: list[dict[str, Any]] | None = None) -> str:
    """DJPQ rows: test accuracy, storage, compression, BOPs against the 8-bit network; the ADMM and DPP joint rows
    (``references``, at their own benchmarks' budgets and settings) beside them."""
    header = ["method", "BOPs target (of 8-bit)", "BOPs reached", "weight bits per layer", "test acc", "storage",
              "compression"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
             f"| dense {name} | - | - | 32 | {fmt_acc(dense['test_acc'])} | {32 * dense['params']:,} bits | 1x |"]
    for r in references or []:
        storage = f"{r['storage_bits']:,} bits ({r['storage_format']})" if "storage_bits" in r else "-"
        compression = f"{r['compression']:.1f}x" if "compression" in r else "-"
        lines.append(f"| {r['label']} | - | - | - | {fmt_acc(r['test_acc'])} | {storage} | {compression} |")
    for r in rows:
        bits = "/".join(str(b) for b in r["layer_bits"].values())
        lines.append(f"| DJPQ, {r['epochs']} epochs | {r['bops_target']:g} | {r['bops']['ratio']:.3f} | {bits} | "
                     f"{fmt_acc(r['test_acc'])} | {r['storage_bits']:,} bits ({r['storage_format']}) | "
                     f"{r['compression']:.1f}x |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="related.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=None, help="default: resnet20 vgg11")
    p.add_argument("--factors", nargs="+", type=float, default=None, help="FLOPs reductions (default 4 8)")
    p.add_argument("--methods", nargs="*", default=list(METHODS))
    p.add_argument("--no-torch-pruning", action="store_true")
    p.add_argument("--budget", type=int, default=2, help="epochs per row in total")
    p.add_argument("--train-epochs", type=int, default=1, help="of the budget, the training methods' own epochs")
    p.add_argument("--djpq-bops", nargs="*", type=float, default=None, help="DJPQ BOPs targets (default 0.25 0.1)")
    p.add_argument("--djpq-epochs", type=int, default=None, help="DJPQ training epochs (default 4)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N training images (smoke runs)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--checkpoint-dir", type=Path, default=CHECKPOINT_DIR)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--quick", action="store_true", help="about a minute: digits, a small ResNet-20, x2")
    p.add_argument("--cached-only", action="store_true",
                   help="write the tables from the rows cached so far, running none (a partial run's results)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        p.error(f"unknown --methods {bad}; accepted: {list(METHODS)}")
    if not 1 <= args.train_epochs < args.budget:
        p.error(f"--train-epochs must be in [1, --budget - 1] (the rest fine-tunes), got {args.train_epochs} of "
                f"{args.budget}")
    args.models = args.models or (["resnet20"] if args.quick else ["resnet20", "vgg11"])
    args.factors = args.factors or ([2.0] if args.quick else [4.0, 8.0])
    args.djpq_bops = args.djpq_bops if args.djpq_bops is not None else ([0.25] if args.quick else [0.25, 0.1])
    args.djpq_epochs = args.djpq_epochs or (2 if args.quick else 4)
    if args.quick:
        args.threads = args.threads or 1
        args.limit = args.limit or 600
    args.finetune_epochs = args.budget  # what run_setup reads: the reference rows fine-tune the whole budget
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(["python", "benchmarks/related.py", *(sys.argv[1:] if argv is None else argv)])
    progress = not args.no_progress
    log = (lambda msg: tqdm.write(msg)) if progress else print
    cache, paths, base = run_setup(args, log)
    jobs = ["l1", "l1-uniform", *args.methods, *([] if args.no_torch_pruning else ["growing-reg"])]
    rows, dense_rows = [], {}
    for model_name in args.models:
        dense, _, s = model_settings(paths[model_name], base)
        sdict = {**s.to_dict(), "budget": args.budget, "train_epochs": args.train_epochs}
        data = prunekit.load_dataset(s.data)
        dense_rows[model_name] = cache.get(f"{model_name}__dense", sdict)
        if dense_rows[model_name] is None and args.cached_only:
            del dense_rows[model_name]
            continue
        if dense_rows[model_name] is None:
            dense_rows[model_name] = dense_summary(dense, data, s)
            cache.put(f"{model_name}__dense", sdict, dense_rows[model_name])
        for factor in args.factors:
            for method in jobs:
                key = row_key(model_name, TOOLS.get(method, "prunekit"), method, factor)
                if args.cached_only:
                    row = cache.get(key, sdict)
                    rows += [row] if row is not None else []
                    continue
                rows.append(cache.get_or_run(key, sdict, channel_row, model_name, method, factor, dense, data, s,
                                             dense_rows[model_name], args, progress,
                                             announce=f"{model_name} x{factor:g} {method}: test acc {{test_acc:.4f}}, "
                                                      "FLOPs {flops_reduction:.2f}x"))
    djpq_rows, lenet = [], None
    if args.djpq_bops:
        path = (quick_dense(cache.directory, "resnet20", args.limit, log) if args.quick
                else args.checkpoint_dir / CHECKPOINTS["lenet5"])
        dense, _, s = model_settings(path, base)
        data = prunekit.load_dataset(s.data)
        sdict = {**s.to_dict(), "djpq_epochs": args.djpq_epochs}
        lenet = cache.get("djpq__dense", sdict)
        if lenet is None and not args.cached_only:
            lenet = dense_summary(dense, data, s)
            cache.put("djpq__dense", sdict, lenet)
        for bops in args.djpq_bops:
            if args.cached_only:
                row = cache.get(f"djpq__bops{bops:g}", sdict)
                djpq_rows += [row] if row is not None else []
                continue
            djpq_rows.append(cache.get_or_run(f"djpq__bops{bops:g}", sdict, djpq_row, dense, data, bops,
                                              args.djpq_epochs, s.seed, replace(s.finetune, epochs=0),
                                              announce=f"DJPQ bops {bops:g}: test acc {{test_acc:.4f}}"))
    payload = {"command": command, "git_commit": git_commit(), "torch": torch.__version__,
               "torch_pruning": tp.__version__, "quick": args.quick, "dense": dense_rows, "rows": rows,
               "djpq_dense": lenet, "djpq": djpq_rows}
    write_json(args.out / "related.json", payload)
    text = ["# Related methods: SPP, IncReg, sDprun, Torch-Pruning's GrowingReg; DJPQ" +
            (" (quick smoke run)" if args.quick else ""), "", "Made by (from the repository root):", "",
            f"    {command}", "", channel_table(rows, dense_rows), ""]
    if djpq_rows and lenet is not None:
        text += [djpq_table(djpq_rows, lenet, "ResNet-20 (quick)" if args.quick else "LeNet-5",
                            [] if args.quick else joint_references()), ""]
    write_text(args.out / "related.md", "\n".join(text))
    print("\n".join(text[6:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
