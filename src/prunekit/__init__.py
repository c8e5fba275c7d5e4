"""prunekit: make trained PyTorch networks smaller and faster while keeping their accuracy."""

from __future__ import annotations

from prunekit.data import DataConfig, DataSplits, list_datasets, load_dataset
from prunekit.jobs import prune
from prunekit.measurement.metrics import (
    ModelSummary,
    count_flops,
    count_params,
    measure_latency,
    storage_bits,
    summarize,
)
from prunekit.methods.channel import PruneConfig, prune_model
from prunekit.models import ModelConfig, create_model, list_models
from prunekit.persistence.architecture import load_compressed, save_compressed
from prunekit.persistence.checkpoint import CheckpointError, load_model, read_metadata, save_checkpoint
from prunekit.training import Augment, FitResult, Schedule, TrainConfig, evaluate, fit

__version__ = "0.1.0"

__all__ = [
    "Augment", "CheckpointError", "DataConfig", "DataSplits", "FitResult", "ModelConfig", "ModelSummary",
    "Schedule", "TrainConfig", "count_flops", "count_params", "create_model", "evaluate", "fit", "list_datasets",
    "list_models", "load_compressed", "load_dataset", "load_model", "measure_latency", "PruneConfig", "prune",
    "prune_model", "read_metadata", "save_checkpoint", "save_compressed", "storage_bits", "summarize",
]
