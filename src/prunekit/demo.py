"""``prunekit demo``: the main job on the embedded ``digits`` data, no download.

Trains a small CIFAR-style ResNet-20 (width 0.5) on scikit-learn's 8x8 digits, prunes it to a quarter of its
FLOPs with prunekit's structural pruning (channel groups removed physically), fine-tunes, and prints and writes a
before/after report (parameters, FLOPs, latency at batch 1 and 64, accuracy) with plots.
"""

from __future__ import annotations

import time
from pathlib import Path

from prunekit.data import DataConfig
from prunekit.jobs import train_job
from prunekit.measurement.plots import plot_before_after
from prunekit.measurement.report import summary_table, write_report
from prunekit.methods.registry import get_method
from prunekit.persistence.checkpoint import CheckpointError
from prunekit.persistence.outputs import output_lock
from prunekit.runner import prune_job
from prunekit.training import Augment, TrainConfig

DEMO_MODEL, DEMO_WIDTH, DEMO_EPOCHS = "resnet20", 0.5, 15
DEMO_METHOD, DEMO_TARGET, DEMO_FINETUNE_EPOCHS = "taylor", "flops=0.25", 20


def run_demo(out_dir: str | Path = "demo-report", epochs: int | None = None, progress: bool = True,
             log=print) -> dict:
    """Run the demo and return the report rows (also written to ``out_dir/report.json``).

    The folder is locked while the demo runs. Run again on the same folder, the demo continues an interrupted
    run (or re-reports a finished one) from its saved epochs and rounds instead of starting over.
    """
    with output_lock(out_dir) as out:
        return _demo(out, epochs, progress, log)


def _demo(out: Path, epochs: int | None, progress: bool, log) -> dict:
    t0 = time.perf_counter()
    train = TrainConfig(epochs=DEMO_EPOCHS if epochs is None else epochs, lr=0.05, augment=Augment.CROP, seed=0)
    resume = (out / "dense" / "train_state.pt").is_file()
    if resume:
        log(f"continuing the demo saved in {out} (delete the folder to start over)")
    log(f"[1/3] training {DEMO_MODEL} (width {DEMO_WIDTH}) on digits for {train.epochs} epochs")
    try:
        dense = train_job(DEMO_MODEL, DataConfig("digits"), train, out / "dense", width=DEMO_WIDTH, resume=resume,
                          progress=progress, log=lambda *_: None)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}; {out} holds a demo run with other settings: delete it or pass another --out"
                              ) from None
    log(f"[2/3] pruning to {DEMO_TARGET} with the {DEMO_METHOD} criterion, fine-tuning {DEMO_FINETUNE_EPOCHS} epochs")
    config = get_method(DEMO_METHOD).config(target=DEMO_TARGET, finetune_epochs=DEMO_FINETUNE_EPOCHS)
    outcome = prune_job(config, checkpoint=dense.checkpoint, train=TrainConfig(epochs=0, lr=0.05, augment=Augment.CROP),
                        out=out / "pruned", progress=progress, resume=(out / "pruned").is_dir(), log=lambda *_: None)
    log("[3/3] measuring")
    run = next(iter(outcome.runs.values()))
    pruned = run.compressed
    rows = {"dense": outcome.rows["dense"], "pruned": pruned}
    plot_before_after(rows, out / "summary.png", title="digits, ResNet-20 x0.5: pruned relative to dense")
    write_report(out, f"prunekit demo: ResNet-20 (width 0.5) on digits, pruned to {DEMO_TARGET}", rows,
                 extra={"model": DEMO_MODEL, "width": DEMO_WIDTH, "train": train.to_dict(), "method": DEMO_METHOD,
                        "target": DEMO_TARGET, "finetune_epochs": DEMO_FINETUNE_EPOCHS},
                 notes=[f"dense: best epoch {dense.fit.best_epoch} chosen on validation",
                        f"pruned: {DEMO_METHOD} criterion, global allocation, weights re-fitted by least squares, "
                        f"BatchNorm re-estimated, val acc right after pruning {pruned['val_acc_before_finetune']:.4f}, "
                        f"then {DEMO_FINETUNE_EPOCHS} fine-tuning epochs (best on validation)",
                        f"latency: median of torch.utils.benchmark runs, {pruned['threads']} threads; on 8x8 images a "
                        "forward pass is mostly per-layer overhead, so FLOPs savings show less in time than on "
                        "larger inputs (see benchmarks/)",
                        f"pruned model: pruned/{run.label}/model.safetensors (load with prunekit.load_compressed); "
                        "pruned/recipe.yaml re-runs the pruning (prunekit prune --config)"],
                 images=["summary.png", "dense/training.png", f"pruned/{run.label}/kept_width.png"])
    log("")
    log(summary_table(rows))
    log(f"\nreport: {out / 'report.md'}   ({time.perf_counter() - t0:.0f} s)")
    return rows
