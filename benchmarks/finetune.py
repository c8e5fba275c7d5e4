"""The fine-tuning recipe for pruned networks: which learning rate and warm-up recover the most, chosen on validation.

Three networks: the committed Fashion-MNIST ResNet-20 (with BatchNorm) pruned to 1/8 of its FLOPs and LeNet-5
(without) pruned to 1/2, and a LeNet-5 trained here on digits (small data: 22 steps in two epochs) pruned to 1/2,
each once by L2 (``prunekit.prune_`` with ``prunekit.L2Config``, one-shot, BatchNorm re-estimated where there is
any, no fine-tuning). Every recipe then fine-tunes a copy of each pruned network for ``--epochs`` epochs (SGD,
Nesterov momentum 0.9, weight decay 5e-4, batch 128; crop+flip for ResNet-20, none for the Fashion-MNIST LeNet-5,
crop for digits): peak learning rates ``--lrs`` times warm-ups ``--warmups`` (the fraction of the steps over which
the rate rises linearly from lr/25 before the cosine decay, ``prunekit.TrainConfig.warmup``). Each row reports the
validation accuracy of its best epoch and that epoch's test accuracy. The recipe with the best mean validation
accuracy over the networks is the fine-tuning default of ``prunekit prune`` (``prunekit.training.FINETUNE_LR``
and ``FINETUNE_WARMUP``; ADMM and DPP keep the rate their own benchmarks were tuned at).

    python benchmarks/finetune.py                        # ResNet-20 at x8, two LeNet-5 at x2 FLOPs, 2 epochs
    python benchmarks/finetune.py --quick --out /tmp/q   # about a minute: digits, small networks, 1 epoch

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
    CONV_MODELS,
    LENETS,
    ROOT,
    RowCache,
    checkpoint_paths,
    quick_dense,
    quiet,
    sha256,
    write_json,
    write_text,
)
from prunekit.jobs import load_dense

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "finetune"
# the networks of the sweep: FLOPs kept, augmentation; lenet5-digits is the small-data case (1,298 training images:
# 22 steps in 2 epochs), the LeNet-5 that --quick trains on digits
MODELS = {"resnet20": (0.125, prunekit.Augment.CROP_FLIP), "lenet5": (0.5, prunekit.Augment.NONE),
          "lenet5-digits": (0.5, prunekit.Augment.CROP)}


def pruned_copy(dense, data, flops: float, augment: prunekit.Augment) -> torch.nn.Module:
    """``dense`` pruned once by L2 to ``flops`` of its FLOPs, BatchNorm re-estimated, not fine-tuned."""
    torch.manual_seed(0)
    net = copy.deepcopy(dense)
    context = prunekit.RunContext(train=prunekit.TrainConfig(epochs=0, augment=augment), seed=0, progress=False,
                                  log=quiet)
    prunekit.prune_(net, prunekit.L2Config(target=prunekit.Target("flops", flops)), data, context)
    return net


def recipe_row(pruned, data, lr: float, warmup: float, epochs: int, augment: prunekit.Augment) -> dict[str, Any]:
    """Fine-tune a copy of ``pruned`` with one recipe; the best epoch on validation is kept."""
    torch.manual_seed(0)
    net = copy.deepcopy(pruned)
    train = prunekit.TrainConfig(epochs=epochs, lr=lr, warmup=warmup, batch_size=128, augment=augment, seed=0)
    result = prunekit.fit(net, data, train, progress=False)
    return {"lr": lr, "warmup": warmup, "epochs": epochs, "best_epoch": result.best_epoch,
            "val_acc": result.best_val_acc, "test_acc": prunekit.evaluate(net, data.test)["acc"],
            "history": result.history}


def recipe_key(row: dict[str, Any]) -> tuple[float, float]:
    return row["lr"], row["warmup"]


def best_recipe(rows: dict[str, list[dict[str, Any]]]) -> tuple[float, float]:
    """The (lr, warm-up) with the best validation accuracy averaged over the networks (ties: the first)."""
    keys = [recipe_key(r) for r in next(iter(rows.values()))]
    mean = {k: sum(r["val_acc"] for model_rows in rows.values() for r in model_rows if recipe_key(r) == k)
            / len(rows) for k in keys}
    return max(keys, key=lambda k: mean[k])


def table(payload: dict[str, Any]) -> str:
    """One row per recipe: each network's validation (test) accuracy and the mean validation accuracy."""
    models = payload["models"]
    chosen = tuple(payload["chosen"].values())
    lines = ["| peak lr | warm-up | " + " | ".join(f"{m} val (test) %" for m in models) + " | mean val % | chosen |",
             "|---|---|" + "---|" * len(models) + "---|---|"]
    first = next(iter(models.values()))["rows"]
    for r in first:
        key = recipe_key(r)
        cells = [next(x for x in m["rows"] if recipe_key(x) == key) for m in models.values()]
        mean = sum(c["val_acc"] for c in cells) / len(cells)
        lines.append(f"| {key[0]:g} | {key[1]:g} | " + " | ".join(
            f"{100 * c['val_acc']:.2f} ({100 * c['test_acc']:.2f})" for c in cells)
            + f" | {100 * mean:.2f} | {'yes' if key == chosen else ''} |")
    lines += ["", "Before fine-tuning: " + ", ".join(
        f"{name} {100 * m['pruned_test_acc']:.2f}% test (dense {100 * m['dense_test_acc']:.2f}%)"
        for name, m in models.items()) + "."]
    return "\n".join(lines)


def plot(payload: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = payload["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(4.5 * len(models), 3.2), squeeze=False)
    for ax, (name, m) in zip(axes[0], models.items()):
        rows = m["rows"]
        x = range(len(rows))
        ax.bar([i - 0.2 for i in x], [100 * r["val_acc"] for r in rows], 0.4, label="validation (chooses)")
        ax.bar([i + 0.2 for i in x], [100 * r["test_acc"] for r in rows], 0.4, label="test")
        best = max(100 * max(r["val_acc"], r["test_acc"]) for r in rows)
        ax.set_ylim(max(0, best - 10), best + 1), ax.set_xticks(list(x))
        ax.set_xticklabels([f"lr {r['lr']:g}\nwu {r['warmup']:g}" for r in rows], fontsize=7)
        ax.set_title(name), ax.set_ylabel("accuracy %"), ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="finetune.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--lrs", nargs="+", type=float, default=[0.01, 0.02, 0.05])
    p.add_argument("--warmups", nargs="+", type=float, default=[0.0, 0.15])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--checkpoint-dir", type=Path, default=CHECKPOINT_DIR)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if any(not lr > 0 for lr in args.lrs) or any(not 0 <= w < 1 for w in args.warmups) or args.epochs < 1:
        p.error(f"--lrs must be > 0, --warmups in [0, 1) and --epochs >= 1; got {args.lrs}, {args.warmups}, "
                f"{args.epochs}")
    if args.quick:
        args.lrs, args.epochs = args.lrs[:2], 1
        torch.set_num_threads(1)
    command = shlex.join(["python", "benchmarks/finetune.py", *(sys.argv[1:] if argv is None else argv)])
    cache = RowCache(args.out / "cache")
    payload: dict[str, Any] = {"command": command, "models": {}}
    for name, (flops, augment) in MODELS.items():
        if args.quick or name == "lenet5-digits":
            if args.quick and name == "lenet5-digits":
                continue  # --quick already runs both networks on digits
            checkpoint, augment = quick_dense(cache.directory, name.removesuffix("-digits")), prunekit.Augment.CROP
        else:
            checkpoint = checkpoint_paths([name], args.checkpoint_dir, (*CONV_MODELS, *LENETS))[name]
        dense, _, data_cfg = load_dense(None, checkpoint, None)
        data = prunekit.load_dataset(data_cfg)
        pruned = pruned_copy(dense, data, flops, augment)
        settings = {"checkpoint_sha256": sha256(checkpoint), "flops": flops, "augment": augment.value}
        rows = [cache.get_or_run(f"{name}__l2__flops{flops:g}__lr{lr:g}__warmup{w:g}__e{args.epochs}", settings,
                                 recipe_row, pruned, data, lr, w, args.epochs, augment,
                                 announce=f"{name} lr {lr:g} warm-up {w:g}: val acc {{val_acc:.4f}}, test acc "
                                          "{test_acc:.4f}")
                for lr in args.lrs for w in args.warmups]
        payload["models"][name] = {"flops": flops, "augment": augment.value, "rows": rows,
                                   "dense_test_acc": prunekit.evaluate(dense, data.test)["acc"],
                                   "pruned_test_acc": prunekit.evaluate(pruned, data.test)["acc"]}
    lr, warmup = best_recipe({name: m["rows"] for name, m in payload["models"].items()})
    payload["chosen"] = {"lr": lr, "warmup": warmup}
    write_json(args.out / "finetune.json", payload)
    plot(payload, args.out / "finetune.png")
    md = ["# Fine-tuning recipes for pruned networks" + (" (quick smoke run)" if args.quick else ""), "",
          "Made by (from the repository root):", "", f"    {command}", "",
          f"Each network pruned once by L2 ({', '.join(f'{n} to {m[0]:g} of the FLOPs' for n, m in MODELS.items())}), "
          f"then {args.epochs} epoch(s) of fine-tuning per recipe (SGD, Nesterov 0.9, weight decay 5e-4, batch 128, "
          "cosine after the warm-up); the recipe with the best mean validation accuracy is chosen.", "",
          table(payload), "", f"Chosen: lr {lr:g}, warm-up {warmup:g}.", "", "![recipes](finetune.png)", ""]
    write_text(args.out / "finetune.md", "\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
