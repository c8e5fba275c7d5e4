"""Structured channel pruning: score coupled channel groups with a criterion, allocate the target over them, re-fit
the remaining weights, remove the channels physically, re-estimate BatchNorm and fine-tune, in one or several
rounds.

One registered method per criterion, each with its own config class:

* ``l1`` / ``l2`` -- weight-slice norms (Li et al. 2017, arXiv 1608.08710);
* ``bn`` -- |BatchNorm scale| (network slimming, Liu et al. 2017, arXiv 1708.06519);
* ``taylor`` -- first-order Taylor ``(sum w g)^2`` (Molchanov et al. 2019, arXiv 1906.10771);
* ``random`` -- the control every criterion should beat;
* ``c-obd``, ``c-obs``, ``kron-obd``, ``kron-obs`` -- the curvature baselines of EigenDamage (Wang et al. 2019,
  arXiv 1905.05934), with OBS weight compensation before removal for the OBS ones.

Before the shrink every conv and linear layer is re-fitted by least squares so that its output matches the unpruned
network's (:func:`~prunekit.recovery.reconstruction.reconstruct_`), then the shrink is checked against masking.

>>> import torch, prunekit
>>> data = prunekit.load_dataset("synthetic")
>>> _ = torch.manual_seed(0)
>>> model = prunekit.create_model("lenet5", num_classes=4, in_channels=1, input_size=12)
>>> dense_flops = prunekit.count_flops(model, (1, 1, 12, 12))
>>> record = prunekit.prune_(model, prunekit.L1Config(target="flops=0.5"), data,
...                          prunekit.RunContext(log=lambda *_: None))
>>> record.method, len(record.changes), 0.48 < record.rounds[-1]["flops"] / dense_flops < 0.52
('l1', 1, True)
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from torch import nn

from prunekit.channels.criteria import CRITERIA, Criterion, score_groups
from prunekit.channels.graph import ChannelGraph
from prunekit.configs import Config, coerce_fields
from prunekit.curvature.kfac import ConvFactor, FisherSettings, ObsUpdate
from prunekit.data import DataSplits
from prunekit.measurement.latency_table import ROUNDINGS, LatencyTable
from prunekit.methods.registry import MethodSpec, PruneRecord, RunContext, register
from prunekit.methods.rounds import (
    RoundStep,
    kept_widths,
    layer_widths,
    measured_rounding_choice,
    record_latency,
    run_rounds,
    score_batches,
    target_latency_table,
)
from prunekit.planning.allocation import (
    AllocationConfig,
    CostModel,
    Target,
    TargetMetric,
    check_latency_settings_use,
    plan_for_target,
    removed_importance,
)
from prunekit.planning.schedule import RoundSchedule
from prunekit.recovery.reconstruction import reconstruct_


def _non_negative(config: Any, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")


@dataclass(frozen=True)
class ChannelConfig(Config):
    """Channel pruning settings shared by every criterion.

    Args:
        target: Keep this fraction of the FLOPs, parameters, channels or measured latency (``flops=0.25``,
            ``flops=x4``, ``latency=x2``: twice as fast in the engine, batch and threads of ``--engine``,
            ``--batch``, ``--latency-threads``).
        allocation: How the target is spread over the groups (uniform or global, a per-layer cap, rounding, and
            how latency is measured).
        schedule: Rounds of prune, recover and fine-tune (1 = one-shot).
        ignore: Modules to leave alone, containers included (the output layer always is).
        residual: Also prune a transformer's residual-stream width (channels that pass through LayerNorm).
            Removing them is not the same as masking them: each round reports how much the outputs changed
            (``output_change`` in the round's record) and relies on the re-fit and fine-tuning to recover.
        reconstruction_images: Training images for the layer-wise least-squares re-fit before each shrink
            (0 = off).
        bn_images: Training images for BatchNorm re-estimation after each shrink (0 = off).
        finetune_epochs: Fine-tuning epochs after each round (best epoch on validation).
    """

    target: Target = Target(TargetMetric.FLOPS, 0.5)
    allocation: AllocationConfig = AllocationConfig()
    schedule: RoundSchedule = RoundSchedule()
    ignore: tuple[str, ...] = ()
    residual: bool = False
    reconstruction_images: int = 256
    bn_images: int = 512
    finetune_epochs: int = 0

    def __post_init__(self) -> None:
        coerce_fields(self)
        if not isinstance(self.target, Target):
            raise ValueError(f"target must be a Target or text like flops=0.25, got {self.target!r}")
        object.__setattr__(self, "ignore", tuple(self.ignore))
        _non_negative(self, "reconstruction_images", "bn_images", "finetune_epochs")
        check_latency_settings_use(self.target, self.allocation.latency)

    def criterion(self, seed: int) -> Criterion:
        """The criterion that scores the groups."""
        return CRITERIA.get(self.method)()

    def scoring_batches(self) -> int:
        """Training batches a data-driven criterion sees."""
        return 0


@dataclass(frozen=True)
class L1Config(ChannelConfig):
    """L1-norm channel pruning (Li et al. 2017): ``s_c = sum |w|`` over every weight slice the channel removes."""


@dataclass(frozen=True)
class L2Config(ChannelConfig):
    """L2-norm channel pruning: ``s_c = sqrt(sum w^2)`` over every weight slice the channel removes."""


@dataclass(frozen=True)
class BNConfig(ChannelConfig):
    """Network slimming (Liu et al. 2017): ``s_c = sum |gamma_c|`` over the BatchNorm layers of the group."""


@dataclass(frozen=True)
class RandomConfig(ChannelConfig):
    """Uniform random channel scores (seeded by the run's seed): the control every criterion should beat."""

    def criterion(self, seed: int) -> Criterion:
        return CRITERIA.get(self.method)(seed)


@dataclass(frozen=True)
class TaylorConfig(ChannelConfig):
    """First-order Taylor channel pruning (Molchanov et al. 2019): ``I_c = (sum w g)^2`` averaged over batches.

    Args:
        score_batches: Training batches of 64 the gradients average over.
    """

    score_batches: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.score_batches, bool) or not isinstance(self.score_batches, int) or self.score_batches < 1:
            raise ValueError(f"score_batches must be >= 1, got {self.score_batches!r}")

    def scoring_batches(self) -> int:
        return self.score_batches


@dataclass(frozen=True)
class CurvatureChannelConfig(ChannelConfig):
    """Channel pruning by a curvature criterion (K-FAC factors, Martens & Grosse 2015).

    Args:
        curvature: Fisher type, batches and damping.
        conv_factor: A convolution's input factor: full im2col patches or channels only.
    """

    curvature: FisherSettings = FisherSettings()
    conv_factor: ConvFactor = ConvFactor.PATCHES

    def curvature_config(self, seed: int):
        return self.curvature.curvature(seed, self.conv_factor)

    def criterion(self, seed: int) -> Criterion:
        return CRITERIA.get(self.method)(self.curvature_config(seed))

    def scoring_batches(self) -> int:
        return self.curvature.fisher_batches


@dataclass(frozen=True)
class COBDConfig(CurvatureChannelConfig):
    """C-OBD (EigenDamage's baseline): diagonal-Fisher OBD ``1/2 F_ii w_i^2`` summed over the channel."""


@dataclass(frozen=True)
class KronOBDConfig(CurvatureChannelConfig):
    """Kron-OBD: ``1/2 G_ii w_i^T A w_i`` per removed row of a layer, in Kronecker-factored form."""


@dataclass(frozen=True)
class OBSChannelConfig(CurvatureChannelConfig):
    """A curvature criterion with Optimal Brain Surgeon weight compensation.

    Args:
        obs_update: Compensation of the remaining weights: ``individual`` (sum of per-channel updates), ``joint``
            (one exact update for all removed channels of a layer) or ``none``.
    """

    obs_update: ObsUpdate = ObsUpdate.INDIVIDUAL

    def curvature_config(self, seed: int):
        return self.curvature.curvature(seed, self.conv_factor, self.obs_update)


@dataclass(frozen=True)
class COBSConfig(OBSChannelConfig):
    """C-OBS: single-weight K-FAC OBS ``w_i^2 / (2 [F^-1]_ii)`` summed over the channel, with compensation."""


@dataclass(frozen=True)
class KronOBSConfig(OBSChannelConfig):
    """Kron-OBS: ``w_i^T A w_i / (2 [G^-1]_ii)`` per removed row, with the OBS correction of the other weights."""


def channel_step(model: nn.Module, data: DataSplits, config: ChannelConfig, seed: int, target: Target,
                 round_: int, latency: LatencyTable | None = None) -> RoundStep:
    """Score channel groups, allocate, compensate (OBS), re-fit and shrink ``model`` in place."""
    example = data.example_inputs()
    graph = ChannelGraph(model, example, ignore=config.ignore, residual=config.residual)
    if not graph.groups:
        skipped = "; ".join(f"{a}: {b}" for a, b in list(graph.skipped.items())[:3])
        raise ValueError("no prunable channel groups were found: "
                         + (f"skipped {skipped}" if skipped else f"every layer is ignored ({', '.join(graph.ignore)})")
                         + "; ignore fewer layers")
    criterion = config.criterion(seed)
    if criterion.needs_data:
        criterion.prepare(model, graph, score_batches(data, config.scoring_batches(), seed + round_))
    scores = score_groups(criterion, graph)
    cost = CostModel(model, graph, inputs=data.flops_inputs(), latency=latency)
    details: dict[str, Any] = {}
    if latency is not None and target.metric is TargetMetric.LATENCY:
        def shrunk(plan):
            candidate = copy.deepcopy(model)
            ChannelGraph(candidate, example, ignore=config.ignore, residual=config.residual).shrink_(plan)
            return candidate

        a = config.allocation
        plan, predicted, measured = measured_rounding_choice(
            model, tuple(example.shape[1:]), target, a.latency, list(ROUNDINGS) if a.round_to is None else
            [a.round_to], lambda t, r: plan_for_target(scores, cost, t, a, round_to=r), shrunk,
            lambda p: removed_importance(scores, p))
        details.update(measured)
    else:
        plan, predicted = plan_for_target(scores, cost, target, config.allocation)
    reference = copy.deepcopy(model) if config.reconstruction_images else None
    criterion.update_weights_(graph, plan)  # OBS: compensate the remaining weights before removal
    if reference is not None:
        if not isinstance(data, DataSplits):
            raise ValueError("the least-squares re-fit reads training images; set reconstruction_images=0 "
                             f"(--reconstruction-images 0) for {type(data).__name__}")
        graph.apply_masks_(plan)
        reconstruct_(model, reference, data.train, config.reconstruction_images, masks=graph.masks(plan))
    graph.shrink_(plan)
    change = graph.change(plan, config.ignore)
    if graph.output_change:
        details["output_change"] = graph.output_change
    return RoundStep(change, predicted, plan.num_removed(), "channels", details)


def prune_channels_(model: nn.Module, data: DataSplits, config: ChannelConfig, ctx: RunContext) -> PruneRecord:
    """Channel pruning of ``model`` in place (the ``apply`` of every channel criterion)."""
    dense_widths = layer_widths(model)
    settings = config.allocation.latency
    table = target_latency_table(model, data, config.target, settings, ctx, config.ignore)
    record = run_rounds(model, data, config.target, config.schedule,
                        lambda m, target, r: channel_step(m, data, config, ctx.seed, target, r, table), ctx,
                        method=config.method, config=config, bn_images=config.bn_images,
                        finetune_epochs=config.finetune_epochs, latency=table)
    record.kept_width = kept_widths(model, dense_widths)
    a = config.allocation
    rounding = f"--round-to {a.round_to}" if a.round_to is not None else (
        "kept widths on multiples of 1, 4, 8 or 16, whichever plan measured at the target removed the least "
        "importance")
    record_latency(record, model, table, settings, f"{rounding}; every plan checked by measurement")
    record.notes.append(f"criterion {config.method}, {a.allocation.value} allocation (max {a.max_per_layer:.0%} "
                        f"of a group), {config.schedule.iterations} round(s), {config.finetune_epochs} fine-tune "
                        "epoch(s) per round, model chosen on validation")
    record.notes.append("accuracy right after pruning: after the least-squares re-fit and BatchNorm re-estimation, "
                        "before any training")
    return record


_PAPERS = {
    "l1": "Li et al. 2017, Pruning Filters for Efficient ConvNets, arXiv 1608.08710",
    "l2": "Li et al. 2017, arXiv 1608.08710 (L2 variant)",
    "bn": "Liu et al. 2017, Learning Efficient Convolutional Networks through Network Slimming, arXiv 1708.06519",
    "taylor": "Molchanov et al. 2019, Importance Estimation for Neural Network Pruning, arXiv 1906.10771",
    "random": "a control",
    "c-obd": "Wang et al. 2019, EigenDamage, arXiv 1905.05934 (baseline)",
    "c-obs": "Wang et al. 2019, EigenDamage, arXiv 1905.05934 (baseline)",
    "kron-obd": "Wang et al. 2019, EigenDamage, arXiv 1905.05934 (baseline)",
    "kron-obs": "Wang et al. 2019, EigenDamage, arXiv 1905.05934 (baseline)",
}
_CONFIGS: dict[str, type[ChannelConfig]] = {
    "l1": L1Config, "l2": L2Config, "bn": BNConfig, "taylor": TaylorConfig, "random": RandomConfig,
    "c-obd": COBDConfig, "c-obs": COBSConfig, "kron-obd": KronOBDConfig, "kron-obs": KronOBSConfig,
}

import prunekit.curvature.obs  # noqa: E402, F401  (registers the curvature criteria)

for _name, _config in _CONFIGS.items():
    register(MethodSpec(_name, _config, prune_channels_, _PAPERS[_name],
                        f"channels removed physically, scored by {CRITERIA.help(_name)}"))
