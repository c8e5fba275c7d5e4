"""prunekit: make trained PyTorch networks smaller and faster while keeping their accuracy.

One verb compresses a model in place with any registered method, chosen by its config's type
(``prunekit.prune_(model, prunekit.L1Config(target="flops=0.25"), data)``); one job runs it on a checkpoint, measures
and reports (``prunekit.prune_job``); ``prunekit.list_methods()`` names them all.
"""

from __future__ import annotations

from prunekit.curvature.kfac import ConvFactor, DampingMode, FisherSettings, FisherType, ObsUpdate
from prunekit.data import DataConfig, DataSplits, list_datasets, load_dataset
from prunekit.measurement.metrics import (
    ModelSummary,
    count_flops,
    count_params,
    measure_latency,
    storage_bits,
    summarize,
)
from prunekit.methods.admm import ADMMConfig
from prunekit.methods.channel import (
    BNConfig,
    COBDConfig,
    COBSConfig,
    KronOBDConfig,
    KronOBSConfig,
    L1Config,
    L2Config,
    RandomConfig,
    TaylorConfig,
)
from prunekit.methods.djpq import DJPQConfig
from prunekit.methods.dpp import DPPConfig
from prunekit.methods.eigendamage import BottleneckForm, EigenDamageConfig
from prunekit.methods.increg import IncRegConfig
from prunekit.methods.registry import PruneRecord, RunContext, get_method, list_methods, method_for, prune_
from prunekit.methods.sdprun import SDprunConfig
from prunekit.methods.spp import SPPConfig
from prunekit.models import ModelConfig, create_model, list_models
from prunekit.persistence.architecture import load_compressed, save_compressed
from prunekit.persistence.checkpoint import CheckpointError, load_model, read_metadata, save_checkpoint
from prunekit.persistence.huggingface import load_pretrained, load_pruned, save_pruned
from prunekit.persistence.recipe import JobConfig, ModelSource, Recipe
from prunekit.planning.allocation import Allocation, AllocationConfig, InfeasibleTargetError, Target, TargetMetric
from prunekit.planning.constraints import QuantConstraint, QuantKind
from prunekit.planning.pattern import Pattern
from prunekit.planning.schedule import Annealing, RoundSchedule, TemperatureSchedule
from prunekit.recovery.distill import DistillConfig
from prunekit.runner import JobResult, prune_job, run_recipe
from prunekit.training import Augment, FitResult, Schedule, TrainConfig, evaluate, fit

__version__ = "0.2.0"

__all__ = [
    "ADMMConfig", "Allocation", "AllocationConfig", "Annealing", "Augment", "BNConfig", "BottleneckForm",
    "CheckpointError", "COBDConfig", "COBSConfig", "ConvFactor", "count_flops", "count_params", "create_model",
    "DampingMode", "DataConfig", "DataSplits", "DistillConfig", "DJPQConfig", "DPPConfig", "EigenDamageConfig",
    "evaluate", "FisherSettings", "FisherType", "fit", "FitResult", "get_method", "IncRegConfig",
    "InfeasibleTargetError", "JobConfig", "JobResult", "KronOBDConfig", "KronOBSConfig", "L1Config", "L2Config",
    "list_datasets", "list_methods", "list_models", "load_compressed", "load_dataset", "load_model",
    "load_pretrained", "load_pruned", "measure_latency", "method_for", "ModelConfig", "ModelSource", "ModelSummary",
    "ObsUpdate", "Pattern", "prune_", "prune_job", "PruneRecord", "QuantConstraint", "QuantKind", "RandomConfig",
    "read_metadata", "Recipe", "RoundSchedule", "run_recipe", "RunContext", "save_checkpoint", "save_compressed",
    "save_pruned", "Schedule", "SDprunConfig", "SPPConfig", "storage_bits", "summarize", "Target", "TargetMetric",
    "TaylorConfig", "TemperatureSchedule", "TrainConfig",
]
