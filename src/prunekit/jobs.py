"""The jobs behind the CLI verbs, callable from Python: ``train_job`` builds, trains, measures and saves."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.checkpoint import atomic_write, save_checkpoint
from prunekit.data import DataConfig, DataSplits, load_dataset
from prunekit.distributed import DistContext, init_distributed
from prunekit.metrics import ModelSummary, summarize
from prunekit.models import ModelConfig, create_model
from prunekit.training import Augment, FitResult, TrainConfig, evaluate, fit


def default_augment(dataset: str) -> Augment:
    """Crop+flip for natural images and clothes; crop only for digits, whose mirror images are other digits."""
    return Augment.CROP if dataset in ("digits", "mnist", "synthetic") else Augment.CROP_FLIP


@dataclass
class TrainOutcome:
    model: nn.Module
    data: DataSplits
    fit: FitResult
    summary: ModelSummary
    checkpoint: Path | None


def build_for_data(model: str | ModelConfig, data: DataSplits, width: float = 1.0) -> nn.Module:
    """A zoo model sized for ``data`` (channels, image side, classes)."""
    config = model if isinstance(model, ModelConfig) else ModelConfig(
        name=model, num_classes=data.num_classes, in_channels=data.in_channels, input_size=data.input_size,
        width=width)
    return create_model(config)


def train_job(model: str, data: DataConfig, train: TrainConfig, out_dir: str | Path | None = None, *,
              width: float = 1.0, resume: bool = False, progress: bool = True, log=print,
              device: str = "auto", measure_latency: bool = True) -> TrainOutcome:
    """Build a zoo model for ``data``, train it (best on validation), measure it and save ``model.safetensors``.

    Runs unchanged under ``torchrun``: only rank 0 writes files and prints.
    """
    ctx: DistContext = init_distributed(device)
    say = log if ctx.is_main else (lambda *_: None)
    splits = load_dataset(data)
    say(splits.describe())
    torch.manual_seed(train.seed)
    config = ModelConfig(name=model, num_classes=splits.num_classes, in_channels=splits.in_channels,
                         input_size=splits.input_size, width=width)
    net = create_model(config)
    meta: dict[str, Any] = {"model": config.to_dict(), "data": data.to_dict()}
    result = fit(net, splits, train, out_dir, resume=resume, progress=progress, metadata=meta, log=say, ctx=ctx)
    net.to("cpu").eval()
    summary = summarize(net, splits, latency=measure_latency and ctx.is_main)
    if ctx.world_size > 1:  # evaluate() all-reduces, so accuracies are global on every rank
        summary = ModelSummary(**{**summary.to_dict(), "test_acc": evaluate(net, splits.test, ctx=ctx)["acc"]})
    path = None
    if out_dir is not None and ctx.is_main:
        out = Path(out_dir)
        meta.update(train=train.to_dict(), epoch=result.best_epoch, metrics=summary.to_dict())
        path = save_checkpoint(out / "model.safetensors", net, meta)
        atomic_write(out / "history.json", lambda tmp: Path(tmp).write_text(json.dumps(result.history, indent=1)))
        if result.history:
            from prunekit.plots import plot_history

            plot_history(result.history, out / "training.png", title=f"{model} on {data.name}")
    say(f"best epoch {result.best_epoch}: val acc {summary.val_acc:.4f}, test acc {summary.test_acc:.4f}")
    return TrainOutcome(net, splits, result, summary, path)
