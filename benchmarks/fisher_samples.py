"""How many batches EigenDamage's K-FAC statistics need: rank stability of the kept eigen-directions against the
number of batches, and what the statistics cost.

For each ``--batches`` N (batches of 64 training images), one EigenDamage round (``eigendamage_round_``: K-FAC
statistics, the global threshold, the bottleneck rebuild; ``prunekit.FisherSettings`` defaults otherwise) prunes a
copy of the committed Fashion-MNIST ResNet-20 to ``--flops`` of its FLOPs, twice, from two independent samples
(seeds 0 and 1; ``--pairs`` such pairs, averaged). The instability is the mean over layers and sides of
``|rank_a - rank_b| / width``: how far the kept ranks move when only the sample changes (a layer left dense counts
at its full width). The cost is the round's time over the time of one training epoch (measured from 20 training
steps of the dense network). The default ``fisher_batches`` is the most stable N within a quarter of an epoch.

    python benchmarks/fisher_samples.py                        # ResNet-20 at x4 FLOPs, N = 8 16 32 64
    python benchmarks/fisher_samples.py --quick --out /tmp/q   # about a minute: digits, small ResNet-20

Every finished row is cached in ``<out>/cache``; an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import copy
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import prunekit
from common import (
    CHECKPOINT_DIR,
    CONV_MODELS,
    ROOT,
    RowCache,
    checkpoint_paths,
    quick_dense,
    sha256,
    write_json,
    write_text,
)
from prunekit.jobs import load_dense
from prunekit.methods.eigendamage import KFEBottleneck, eigendamage_round_
from prunekit.methods.rounds import score_batches

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "fisher_samples"


def kept_ranks(dense, data, batches: int, seed: int, flops: float) -> tuple[dict[str, list[int]], float]:
    """Each layer's kept (input, output) ranks after one round from sample ``seed``, and the round's seconds."""
    net = copy.deepcopy(dense).eval()
    config = prunekit.EigenDamageConfig(curvature=prunekit.FisherSettings(fisher_batches=batches))
    t0 = time.perf_counter()
    eigendamage_round_(net, score_batches(data, batches, seed), data.train[:2][0], prunekit.Target("flops", flops),
                       config.curvature.curvature(seed), config.max_per_layer, config)
    seconds = time.perf_counter() - t0
    return {n: [m.rank_in, m.rank_out] for n, m in net.named_modules() if isinstance(m, KFEBottleneck)}, seconds


def epoch_seconds(dense, data, steps: int = 20) -> float:
    """One training epoch's time (batch 128), from ``steps`` timed SGD steps of the dense network."""
    net = copy.deepcopy(dense).train()
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    x, y = data.train[:128]
    for _ in range(2):  # warm-up
        optimizer.zero_grad()
        F.cross_entropy(net(x), y).backward()
        optimizer.step()
    t0 = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(net(x), y).backward()
        optimizer.step()
    return (time.perf_counter() - t0) / steps * math.ceil(len(data.train) / 128)


def instability(a: dict[str, list[int]], b: dict[str, list[int]], dense) -> float:
    """Mean over layers and sides of ``|rank_a - rank_b| / width`` (a layer left dense: its full width)."""
    modules = dict(dense.named_modules())
    widths = {n: [getattr(modules[n], "in_channels", None) or modules[n].in_features,
                  getattr(modules[n], "out_channels", None) or modules[n].out_features] for n in {*a, *b}}
    moves = [abs(a.get(n, w)[side] - b.get(n, w)[side]) / w[side] for n, w in widths.items() for side in (0, 1)]
    return sum(moves) / max(len(moves), 1)


def row(dense, data, batches: int, flops: float, epoch: float, pairs: int) -> dict[str, Any]:
    """``pairs`` pairs of rounds from independent samples (seeds 0 and 1, 2 and 3, ...)."""
    rounds = [kept_ranks(dense, data, batches, seed, flops) for seed in range(2 * pairs)]
    values = [instability(rounds[2 * i][0], rounds[2 * i + 1][0], dense) for i in range(pairs)]
    seconds = sum(t for _, t in rounds) / len(rounds)
    return {"batches": batches, "images": 64 * batches, "instability": sum(values) / pairs,
            "instability_by_pair": values, "seconds": seconds, "epochs_cost": seconds / epoch,
            "ranks": {f"seed{i}": r for i, (r, _) in enumerate(rounds)}}


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| batches of 64 | images | rank instability (% of width) | round cost (epochs) |", "|---|---|---|---|"]
    lines += [f"| {r['batches']} | {r['images']} | {100 * r['instability']:.2f} | {r['epochs_cost']:.3f} |"
              for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fisher_samples.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", nargs="+", type=int, default=[8, 16, 32, 64])
    p.add_argument("--flops", type=float, default=0.25)
    p.add_argument("--pairs", type=int, default=3, help="pairs of independent samples per row (default 3)")
    p.add_argument("--checkpoint-dir", type=Path, default=CHECKPOINT_DIR)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if any(b < 1 for b in args.batches) or not 0 < args.flops < 1 or args.pairs < 1:
        p.error(f"--batches and --pairs must be >= 1 and --flops in (0, 1), got {args.batches}, {args.pairs} and "
                f"{args.flops}")
    if args.quick:
        args.batches, args.pairs = [2, 4], 1
        torch.set_num_threads(1)
    command = shlex.join(["python", "benchmarks/fisher_samples.py", *(sys.argv[1:] if argv is None else argv)])
    cache = RowCache(args.out / "cache")
    checkpoint = quick_dense(cache.directory, "resnet20") if args.quick else \
        checkpoint_paths(["resnet20"], args.checkpoint_dir, CONV_MODELS)["resnet20"]
    dense, _, data_cfg = load_dense(None, checkpoint, None)
    data = prunekit.load_dataset(data_cfg)
    epoch = epoch_seconds(dense, data)
    settings = {"checkpoint_sha256": sha256(checkpoint), "flops": args.flops, "pairs": args.pairs}
    rows = []
    for n in args.batches:
        r = cache.get_or_run(f"resnet20__flops{args.flops:g}__b{n}", settings, row, dense, data, n, args.flops, epoch,
                             args.pairs,
                             announce=f"{n} batches: instability {{instability:.4f}}, cost {{epochs_cost:.3f}} epochs")
        rows.append({**r, "epochs_cost": r["seconds"] / epoch})  # the cost against this run's epoch
    payload = {"command": command, "epoch_seconds": epoch, "rows": rows}
    write_json(args.out / "fisher_samples.json", payload)
    md = ["# K-FAC sample size for EigenDamage" + (" (quick smoke run)" if args.quick else ""), "",
          "Made by (from the repository root):", "", f"    {command}", "",
          f"One EigenDamage round to {args.flops:g} of the FLOPs of ResNet-20 from each of {args.pairs} pair(s) of "
          "independent samples per row (instability averaged over the pairs); "
          f"one training epoch takes {epoch:.0f} s here ({torch.get_num_threads()} thread(s)).", "", table(rows), ""]
    write_text(args.out / "fisher_samples.md", "\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
