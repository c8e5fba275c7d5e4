"""Plots for reports (matplotlib, Agg backend: works without a display)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig, path: str | Path) -> Path:
    """Write the figure atomically (a kill mid-write never leaves a truncated image) and close it."""
    from prunekit.persistence.checkpoint import atomic_write

    path = Path(path)
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format=path.suffix.lstrip(".") or "png"))
    finally:
        plt.close(fig)
    return path


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
    return _save(fig, path)


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
    return _save(fig, path)


def plot_kept_width(kept: dict[str, tuple[int, int]], path: str | Path, title: str = "") -> Path:
    """Per layer, the original output width and the width kept after pruning."""
    names = list(kept)
    fig, ax = plt.subplots(figsize=(max(6, 0.28 * len(names) + 2), 3.6))
    xs = range(len(names))
    ax.bar(xs, [kept[n][1] for n in names], color="#cccccc", label="dense")
    ax.bar(xs, [kept[n][0] for n in names], color="#1f77b4", label="kept")
    ax.set_xticks(list(xs), names, rotation=90, fontsize=6)
    ax.set_ylabel("output channels")
    ax.legend()
    ax.set_title(title)
    return _save(fig, path)


def plot_accuracy_vs_flops(points: dict[str, list[tuple[float, float]]], path: str | Path, title: str = "",
                           dense: tuple[float, float] | None = None) -> Path:
    """Test accuracy against FLOPs (millions), one line per method; ``dense`` is marked with a star."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, pts in points.items():
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    if dense is not None:
        ax.scatter([dense[0]], [dense[1]], marker="*", s=150, color="black", label="dense", zorder=5)
    ax.set_xscale("log")
    ax.set_xlabel("MFLOPs (log)")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title)
    return _save(fig, path)


def plot_mask_metrics(metrics: Sequence[dict], path: str | Path, title: str = "") -> Path:
    """DPP mask confidence and diversity per layer over epochs (keys ``<layer>/confidence``, ``<layer>/diversity``)."""
    epochs = [m["epoch"] for m in metrics]
    layers = sorted({k.rsplit("/", 1)[0] for m in metrics for k in m if k.endswith("/confidence")})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    for layer in layers:
        ax1.plot(epochs, [m[f"{layer}/confidence"] for m in metrics], marker="o", label=layer)
        ax2.plot(epochs, [m[f"{layer}/diversity"] for m in metrics], marker="o", label=layer)
    ax1.set_xlabel("epoch"), ax1.set_ylabel("mask confidence"), ax1.set_ylim(0, 1)
    ax2.set_xlabel("epoch"), ax2.set_ylabel("pruning diversity"), ax2.set_ylim(0, 1)
    ax1.legend(fontsize=7)
    fig.suptitle(title)
    return _save(fig, path)


def plot_admm_residuals(residuals: dict, path: str | Path, title: str = "", converged: float = 0.01) -> Path:
    """ADMM's convergence, phase after phase (``residuals``: phase -> ``{"removed_energy_per_update": [...],
    "removed_energy": [...]}``): the energy a hard projection would remove at every Z/U update, and what the
    projection removed after each phase, against the ``converged`` line."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    start, names, removed = 0, [], []
    for name, phase in residuals.items():
        values = [max(v, 1e-12) for v in phase.get("removed_energy_per_update", [])]
        if values:
            ax1.plot(range(start + 1, start + len(values) + 1), values, marker=".", label=name)
            start += len(values)
        names.append(name)
        removed.append(max(phase["removed_energy"][-1], 1e-12))
    ax1.axhline(converged, color="k", linestyle="--", linewidth=1)
    ax1.set_yscale("log"), ax1.set_xlabel("Z/U update"), ax1.set_ylabel("||W - Pi(W)||^2 / ||W||^2")
    if start:
        ax1.legend(fontsize=7)
    ax2.bar(names, removed, color=["tab:green" if r <= converged else "tab:red" for r in removed])
    ax2.axhline(converged, color="k", linestyle="--", linewidth=1, label=f"converged ({100 * converged:g}%)")
    ax2.set_yscale("log"), ax2.set_ylabel("energy removed by the projection"), ax2.legend(fontsize=7)
    ax2.tick_params(axis="x", labelsize=7)
    fig.suptitle(title)
    return _save(fig, path)


def plot_comparison(result: dict, path: str | Path, title: str = "") -> Path:
    """``prunekit compare`` at a glance: test accuracy, storage and latency (dense vs sparse kernels) per variant,
    and the measured sparse-vs-dense kernel time against sparsity with its break-even point."""
    rows = result["rows"]
    names = list(rows)
    panels = 4 if result.get("break_even") else 3
    fig, axes = plt.subplots(1, panels, figsize=(3.3 * panels, 3.4))
    x = range(len(names))
    axes[0].bar(x, [100 * rows[n]["test_acc"] for n in names], color="tab:blue")
    lo = min(100 * rows[n]["test_acc"] for n in names)
    axes[0].set_ylim(max(0.0, lo - 5), 100), axes[0].set_ylabel("test accuracy %")
    axes[1].bar(x, [rows[n]["storage_bits"] / 8 / 1024 for n in names], color="tab:green")
    axes[1].set_yscale("log"), axes[1].set_ylabel("storage KiB (best format, log)")
    width = 0.4
    axes[2].bar([i - width / 2 for i in x], [rows[n]["latency_dense_kernel_ms"] for n in names], width,
                label="dense kernels")
    axes[2].bar([i + width / 2 for i in x], [rows[n]["latency_sparse_kernel_ms"] or 0.0 for n in names], width,
                label="sparse kernels")
    axes[2].set_ylabel(f"latency ms (batch {result['batch']})"), axes[2].legend(fontsize=7)
    for ax in axes[:3]:
        ax.set_xticks(list(x)), ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    if result.get("break_even"):
        be = result["break_even"]
        s = [100 * v for v in be["sparsities"]]
        axes[3].plot(s, [be["dense_ms"]] * len(s), label="dense GEMM")
        axes[3].plot(s, be["sparse_ms"], marker="o", label="CSR matmul")
        if be["break_even"] is not None:
            axes[3].axvline(100 * be["break_even"], color="grey", linestyle="--", label="break-even")
        axes[3].set_xlabel(f"sparsity % ({be['layer_shape'][0]}x{be['layer_shape'][1]} layer)")
        axes[3].set_ylabel("ms"), axes[3].legend(fontsize=7)
    fig.suptitle(title)
    return _save(fig, path)


def plot_speedups(rows: Sequence[dict], path: str | Path, title: str = "") -> Path:
    """Speedup over dense of the pruned model and of the uniformly thinned limit, per engine and batch."""
    labels = [f"{r['engine']}\nbatch {r['batch']}" for r in rows]
    x = range(len(rows))
    width = 0.38
    fig, ax = plt.subplots(figsize=(1.6 * len(rows) + 2, 3.4))
    ax.bar([i - width / 2 for i in x], [r["speedup"] for r in rows], width, label="pruned")
    if any(r.get("limit_speedup") for r in rows):
        ax.bar([i + width / 2 for i in x], [r.get("limit_speedup") or 0.0 for r in rows], width,
               label="uniformly thinned, same FLOPs (limit)")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks(list(x)), ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("speedup over dense"), ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)
