"""How much Tikhonov damping the OBS criteria need: validation accuracy right after one-shot pruning (BatchNorm
re-estimated, no fine-tuning) of the committed ResNet-20 Fashion-MNIST checkpoint, for a range of damping values.

The damping default of ``prunekit.FisherSettings`` is Kron-OBS's best value on validation (test
accuracy is reported but not used for the choice); C-OBS's own best is reported beside it. Only the OBS criteria
invert the factors; C-OBD, Kron-OBD and EigenDamage do not depend on damping.

    python benchmarks/damping.py                        # ResNet-20, x4, kron-obs and c-obs, 6 damping values
    python benchmarks/damping.py --quick --out /tmp/q   # seconds: digits, a small ResNet-20

Every finished row is cached in ``<out>/cache``; an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

import prunekit
from common import (
    CHECKPOINT_DIR,
    ROOT,
    RowCache,
    checkpoint_paths,
    prune_copy,
    quick_dense,
    sha256,
    write_json,
    write_text,
)
from prunekit.jobs import load_dense

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "damping"
DAMPINGS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="damping.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=["kron-obs", "c-obs"], choices=["kron-obs", "c-obs"])
    p.add_argument("--dampings", nargs="+", type=float, default=list(DAMPINGS))
    p.add_argument("--factor", type=float, default=4.0, help="FLOPs reduction")
    p.add_argument("--fisher-batches", type=int, default=8)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if any(not (d > 0) for d in args.dampings):
        p.error(f"--dampings must be > 0, got {args.dampings}")
    command = shlex.join(["python", "benchmarks/damping.py", *(sys.argv[1:] if argv is None else argv)])
    cache = RowCache(args.out / "cache")
    if args.quick:
        torch.set_num_threads(1)
        checkpoint = quick_dense(cache.directory, "resnet20", log=print)
    else:
        checkpoint = checkpoint_paths(["resnet20"], CHECKPOINT_DIR)["resnet20"]
    dense, _, data_cfg = load_dense(None, checkpoint, None)
    data = prunekit.load_dataset(data_cfg)
    settings = {"checkpoint_sha256": sha256(checkpoint), "factor": args.factor,
                "fisher_batches": args.fisher_batches, "data": data_cfg.to_dict()}
    rows = []
    for method in args.methods:
        for damping in args.dampings:
            key = f"{method}__damping{damping:g}"
            row = cache.get(key, settings)
            if row is None:
                config = prunekit.get_method(method).config(
                    target=prunekit.Target("flops", 1 / args.factor), reconstruction_images=0,
                    allocation=prunekit.AllocationConfig("global", 0.9),
                    curvature=prunekit.FisherSettings(fisher_batches=args.fisher_batches, damping=damping))
                net = prune_copy(dense, config, data)[0].eval()
                row = {"method": method, "damping": damping, "val_acc": prunekit.evaluate(net, data.val)["acc"],
                       "test_acc": prunekit.evaluate(net, data.test)["acc"]}
                cache.put(key, settings, row)
                print(f"{method} damping {damping:g}: val {row['val_acc']:.4f}, test {row['test_acc']:.4f}")
            rows.append(row)
    best = {m: max((r for r in rows if r["method"] == m), key=lambda r: r["val_acc"])["damping"]
            for m in args.methods}
    default = best.get("kron-obs")
    payload = {"command": command, "settings": settings, "rows": rows, "best_on_validation": best,
               "default": default}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "damping.json", payload)
    lines = ["# Damping of the OBS criteria", "", "Made by (from the repository root):", "", f"    {command}", "",
             f"One-shot pruning to 1/{args.factor:g} of the FLOPs, BatchNorm re-estimated, no fine-tuning; "
             f"true Fisher on {args.fisher_batches} batches of 64. Best on validation: "
             + ", ".join(f"{m} {d:g}" for m, d in best.items())
             + (f"; prunekit's default is Kron-OBS's: {default:g}." if default is not None else "."), "",
             "| method | damping | val acc after pruning % | test acc after pruning % |", "|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['damping']:g} | {100 * r['val_acc']:.2f} | {100 * r['test_acc']:.2f} |"
              for r in rows]
    write_text(args.out / "damping.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
