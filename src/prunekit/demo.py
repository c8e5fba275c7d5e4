"""``prunekit demo``: the main job on the embedded ``digits`` data, no download.

Trains a small CIFAR-style ResNet-20 (width 0.5) on scikit-learn's 8x8 digits, measures it (parameters,
FLOPs, latency at batch 1 and 64, accuracy) and writes a report folder with a plot.
"""

from __future__ import annotations

import time
from pathlib import Path

from prunekit.data import DataConfig
from prunekit.jobs import train_job
from prunekit.plots import plot_before_after
from prunekit.report import summary_table, write_report
from prunekit.training import Augment, TrainConfig

DEMO_MODEL, DEMO_WIDTH, DEMO_EPOCHS = "resnet20", 0.5, 15


def run_demo(out_dir: str | Path = "demo-report", epochs: int | None = None, progress: bool = True,
             log=print) -> dict:
    """Run the demo and return the report rows (also written to ``out_dir/report.json``)."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    train = TrainConfig(epochs=DEMO_EPOCHS if epochs is None else epochs, lr=0.05, augment=Augment.CROP, seed=0)
    log(f"[1/2] training {DEMO_MODEL} (width {DEMO_WIDTH}) on digits for {train.epochs} epochs")
    dense = train_job(DEMO_MODEL, DataConfig("digits"), train, out / "dense", width=DEMO_WIDTH,
                      progress=progress, log=lambda *_: None)
    log("[2/2] measuring")
    rows = {"dense": dense.summary.to_dict()}
    plot_before_after(rows, out / "summary.png", title="digits, ResNet-20 x0.5")
    write_report(out, "prunekit demo: ResNet-20 (width 0.5) on digits", rows,
                 extra={"model": DEMO_MODEL, "width": DEMO_WIDTH, "train": train.to_dict()},
                 notes=[f"best epoch {dense.fit.best_epoch} chosen on validation",
                        f"latency: median of torch.utils.benchmark runs, {dense.summary.threads} threads"],
                 images=["dense/training.png", "summary.png"])
    log("")
    log(summary_table(rows))
    log(f"\nreport: {out / 'report.md'}   ({time.perf_counter() - t0:.0f} s)")
    return rows
