"""The one registry of compression methods: every caller (CLI, Python, benchmarks, reports) dispatches through it.

An entry (:class:`MethodSpec`) holds a frozen config class and one ``apply(model, data, config, context)`` that
compresses the model in place and returns a :class:`PruneRecord`: the architecture changes to replay, the
per-round (or per-phase) metrics and the notes for the report. :func:`prune_` is the one Python verb; it picks
the entry from the config's type, so no code outside this module compares method names.

>>> import prunekit
>>> "l1" in prunekit.list_methods() and "eigendamage" in prunekit.list_methods("eigen*")
True
>>> prunekit.get_method("l1").config.__name__
'L1Config'
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from prunekit.data import DataSplits
from prunekit.registry import Registry
from prunekit.training import FINETUNE_LR, FINETUNE_WARMUP, TrainConfig

# the modules that register methods, imported on first use of the registry
METHOD_MODULES = ("prunekit.methods.channel", "prunekit.methods.eigendamage", "prunekit.methods.admm",
                  "prunekit.methods.dpp", "prunekit.methods.spp", "prunekit.methods.increg",
                  "prunekit.methods.sdprun", "prunekit.methods.djpq")


@dataclass
class RunContext:
    """How a method runs: training settings, seed, a folder for resumable state, logging.

    Args:
        train: Optimiser settings of every training the method does (its epochs come from the method's config).
        seed: Seed of data order, scoring batches and random choices.
        folder: Where rounds, phases and training commits are saved (``None``: in memory, no resume).
        resume: Continue the state saved in ``folder``, after its last finished round, phase or epoch.
        base: How to rebuild the unpruned network (a model spec), recorded in every saved round.
        progress: Show progress bars.
        log: Receives one line per event.
    """

    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=0, lr=0.01))
    seed: int = 0
    folder: Path | None = None
    resume: bool = False
    base: dict[str, Any] | None = None
    progress: bool = True
    log: Callable[[str], None] = print

    def subfolder(self, *parts: str) -> Path | None:
        return self.folder.joinpath(*parts) if self.folder is not None else None


@dataclass
class PruneRecord:
    """What a method did to the model it compressed in place.

    Args:
        method: The registry name.
        changes: Architecture changes to replay on the unpruned network, in order (empty when only weights changed).
        rounds: One dict of metrics per round or phase.
        notes: Lines for the report.
        encoding: How the weights are stored, for the checkpoint and the storage count: ``quant`` (text),
            ``scales`` (layer -> step), ``k_of_n`` (layer -> [k, n]), ``masked_layers`` (layers with zeros that
            are part of the format).
        kept_width: Layer -> (kept, dense) width: output channels, or a bottleneck's rank.
        val_acc_before_finetune, test_acc_before_finetune: Accuracy right after the first round's pruning and
            recovery, before any training (reported, never used to choose anything).
        results: Method-specific results for the report (ADMM residuals, DPP mask metrics, ...).
        figures: File name -> a function that draws the figure at a path.
        latency_settings: Under a ``latency=`` target, the engine, batch and threads it was measured in (the job
            measures the real speedup there).
        predicted_speedup: Under a ``latency=`` target, dense over pruned latency as the table predicts it.
    """

    method: str
    changes: list[dict[str, Any]] = field(default_factory=list)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    encoding: dict[str, Any] = field(default_factory=dict)
    kept_width: dict[str, tuple[int, int]] = field(default_factory=dict)
    val_acc_before_finetune: float | None = None
    test_acc_before_finetune: float | None = None
    results: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, Callable[[Path], Any]] = field(default_factory=dict)
    latency_settings: Any = None
    predicted_speedup: float | None = None


@dataclass(frozen=True)
class MethodSpec:
    """A registered method.

    Args:
        name: What users type (``prunekit prune NAME``).
        config: Its frozen config class.
        apply: ``apply(model, data, config, context) -> PruneRecord``, compressing ``model`` in place.
        paper: The paper it implements (authors, year, arXiv id).
        summary: One line for ``prunekit list methods``.
        lr, warmup: The peak learning rate and warm-up of its training when a job gives none (default: the
            fine-tuning recipe chosen by ``benchmarks/finetune.py``, ``prunekit.training.FINETUNE_LR`` and
            ``FINETUNE_WARMUP``).
    """

    name: str
    config: type
    apply: Callable[[nn.Module, DataSplits, Any, RunContext], PruneRecord]
    paper: str
    summary: str
    lr: float = FINETUNE_LR
    warmup: float = FINETUNE_WARMUP


METHODS: Registry[MethodSpec] = Registry("method")


def register(spec: MethodSpec) -> MethodSpec:
    """Add a method; its config class is tagged with the name so that :func:`method_for` finds it."""
    METHODS.add(spec.name, spec, spec.summary)
    spec.config.method = spec.name
    return spec


def _load() -> None:
    for module in METHOD_MODULES:
        importlib.import_module(module)


def get_method(name: str) -> MethodSpec:
    """The entry called ``name``.

    Raises:
        ValueError: an unknown name, with the known ones and the closest matches.
    """
    _load()
    return METHODS.get(name)


def list_methods(pattern: str = "*") -> list[str]:
    """Method names matching a shell-style wildcard (``"kron*"``)."""
    _load()
    return METHODS.list(pattern)


def method_for(config: Any) -> MethodSpec:
    """The entry whose config class is exactly ``type(config)``.

    Raises:
        TypeError: ``config`` is not a registered method's config.
    """
    _load()
    for name in METHODS.list():
        spec = METHODS.get(name)
        if type(config) is spec.config:
            return spec
    known = ", ".join(METHODS.get(n).config.__name__ for n in METHODS.list())
    raise TypeError(f"{type(config).__name__} is not the config of a registered method; pass one of {known}")


def prune_(model: nn.Module, config: Any, data: DataSplits, context: RunContext | None = None) -> PruneRecord:
    """Compress ``model`` in place with the method ``config`` belongs to (``prunekit.L1Config(...)``,
    ``prunekit.ADMMConfig(...)``, ...), with its schedule, recovery and fine-tuning. Returns what it did.

    ``data`` is a :class:`~prunekit.data.DataSplits` (images), or a task offering what the channel methods read
    of it (``example_inputs``, ``flops_inputs``, ``scoring_batches``, ``accuracy``), such as the sentence-retrieval
    task :class:`prunekit.retrieval.RetrievalData` for a text encoder.

    With ``context.folder``, ``run.json`` there records the model's fingerprint and every setting before any work,
    and ``context.resume`` continues only a run that matches it.

    Raises:
        TypeError: ``config`` is not a method config.
        InfeasibleTargetError: the target cannot be met.
    """
    spec = method_for(config)
    ctx = context or RunContext()
    if ctx.folder is not None:
        from prunekit.persistence.checkpoint import state_fingerprint
        from prunekit.persistence.runs import check_or_write_manifest

        check_or_write_manifest(ctx.folder, ctx.resume, {
            "dense_sha256": state_fingerprint(model), "method": spec.name, "config": config.to_dict(),
            "data": data.config.to_dict(), "train": ctx.train.to_dict(), "seed": ctx.seed})
    return spec.apply(model, data, config, ctx)
