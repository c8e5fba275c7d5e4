"""Plots for reports (matplotlib, Agg backend: works without a display)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_history(history: Sequence[dict], path: str | Path, title: str = "") -> Path:
    """Training/validation loss and accuracy per epoch."""
    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    ax1.plot(epochs, [h["train_loss"] for h in history], label="train")
    ax1.plot(epochs, [h["val_loss"] for h in history], label="validation")
    ax1.set_xlabel("epoch"), ax1.set_ylabel("cross-entropy"), ax1.legend()
    ax2.plot(epochs, [h["train_acc"] for h in history], label="train")
    ax2.plot(epochs, [h["val_acc"] for h in history], label="validation")
    ax2.set_xlabel("epoch"), ax2.set_ylabel("top-1 accuracy"), ax2.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_before_after(rows: dict[str, dict[str, float]], path: str | Path, title: str = "") -> Path:
    """Bar chart of dense vs compressed, each metric relative to the first row (dense = 1)."""
    names = list(rows)
    metrics = [("params", "parameters"), ("flops", "FLOPs"), ("latency_ms_b64", "latency b64"),
               ("test_acc", "test accuracy")]
    base = rows[names[0]]
    fig, ax = plt.subplots(figsize=(7, 3.4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [rows[name][k] / base[k] if base[k] else 0.0 for k, _ in metrics]
        bars = ax.bar([j + i * width for j in range(len(metrics))], values, width, label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(metrics))], [m for _, m in metrics])
    ax.set_ylabel(f"relative to {names[0]}")
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
