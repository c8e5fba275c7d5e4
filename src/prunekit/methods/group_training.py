"""The flow shared by the methods that *train* a network until some channel units can go, then remove them: SPP
(sampled masks, :mod:`prunekit.methods.spp`) and IncReg (growing penalties, :mod:`prunekit.methods.increg`).

A *unit* is what the channel engine removes as one piece: a channel of a coupled group, a set of tied channels
(grouped convolutions), or an attention head. :class:`GroupUnits` holds, for every prunable group, its units, how
many of them the target removes (the same fraction of every group: the papers prune a fixed ratio per layer), the
slices that *produce* a unit's value (the producing conv/linear rows and biases, and the norm layers' scale and
shift), and two per-unit quantities read from them: the L1 norm (the papers' ranking criterion) and the
differentiable squared L2 norm (IncReg's penalty).

:func:`train_then_remove_` runs a method's :class:`~prunekit.training.TrainHooks` for its epochs (committed every
epoch, resumable), zeroes the units the method chose, removes them physically (checked against masking: zeroed
producers leave the network exactly), re-estimates BatchNorm and fine-tunes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from prunekit.channels.graph import ChannelGraph, ChannelGroup, ChannelPlan, ParamSlice, SliceKind
from prunekit.configs import Config, coerce_fields
from prunekit.methods.registry import PruneRecord, RunContext
from prunekit.planning.allocation import (
    AllocationConfig,
    CostModel,
    Target,
    TargetMetric,
    plan_for_target,
    refuse_latency_target,
)


@dataclass(frozen=True)
class UnitTrainingConfig(Config):
    """Settings every method that trains units out shares.

    Args:
        target: Keep this fraction of the FLOPs, parameters or channels (``flops=0.25`` or ``flops=x4``), the same
            fraction of every group.
        ignore: Modules to leave alone, containers included (the output layer always is).
        epochs: Epochs of the method's own training.
        bn_images: Training images for BatchNorm re-estimation after the removal (0 = off).
        finetune_epochs: Fine-tuning epochs after the removal (best epoch on validation).
    """

    target: Target = Target(TargetMetric.FLOPS, 0.5)
    ignore: tuple[str, ...] = ()
    epochs: int = 1
    bn_images: int = 512
    finetune_epochs: int = 0

    def __post_init__(self) -> None:
        coerce_fields(self)
        object.__setattr__(self, "ignore", tuple(self.ignore))
        if not isinstance(self.target, Target):
            raise ValueError(f"target must be a Target or text like flops=0.25, got {self.target!r}")
        refuse_latency_target(self.target, getattr(self, "method", type(self).__name__))
        for name, low in (("epochs", 1), ("bn_images", 0), ("finetune_epochs", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


@dataclass(frozen=True)
class RankIncrementConfig(UnitTrainingConfig):
    """Settings of the methods that move a per-unit quantity by rank (SPP, IncReg).

    Args:
        amplitude: The paper's ``A``, the largest increment per update (``None``: the least important unit reaches
            the end of its range half way through ``epochs``).
        interval: Optimizer steps between rank updates.
    """

    amplitude: float | None = None
    interval: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.interval, bool) or not isinstance(self.interval, int) or self.interval < 1:
            raise ValueError(f"interval must be an int >= 1, got {self.interval!r}")
        a = self.amplitude
        if a is not None and (isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 < a < math.inf):
            raise ValueError(f"amplitude must be a number > 0 (or None: chosen from the budget), got {a!r}")

    def updates(self, data, train) -> int:
        """Rank updates ``epochs`` of training make with one every ``interval`` optimizer steps."""
        steps = self.epochs * math.ceil(len(data.train) / train.batch_size)
        return max(1, steps // self.interval)


def producer_slices(group: ChannelGroup) -> list[ParamSlice]:
    """The slices that make a group channel's value: OUT members' weights and biases, and every norm slice."""
    return [s for m in group.members for s in m.slices if s.is_norm or m.kind is SliceKind.OUT]


class SliceMask(nn.Module):
    """Parametrization multiplying a parameter's slice of one group by that group's channel mask
    (``mask.channel_mask()``, one value per group channel)."""

    def __init__(self, mask: Any, s: ParamSlice) -> None:
        super().__init__()
        # held outside the module tree: a mask holding learned logits belongs to one place in the model, so every
        # state_dict (a checkpoint of the training) holds them once
        self._group = [mask]
        self.dim = s.dim
        self.register_buffer("idxs", s.idxs.clone(), persistent=False)
        self.register_buffer("root_idxs", s.root_idxs.clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        full = torch.ones(x.shape[self.dim], dtype=x.dtype, device=x.device)
        mask = self._group[0].channel_mask().to(x.device)  # a mask kept on the CPU (SPP's draws) meets a GPU weight
        full = full.index_put((self.idxs,), mask[self.root_idxs].to(x.dtype))
        shape = [1] * x.dim()
        shape[self.dim] = -1
        return x * full.reshape(shape)


def trainable_roots(model: nn.Module, graph: ChannelGraph) -> list[str]:
    """The groups whose producing slices are all module parameters (the methods can train and zero them)."""
    params = dict(model.named_parameters())
    return [g.root for g in graph.groups if all(s.name in params for s in producer_slices(g))]


def removal_counts(model: nn.Module, graph: ChannelGraph, inputs: Any, target: Target) -> dict[str, int]:
    """Units removed per group so that removing the same fraction of every trainable group meets ``target``
    (uniform allocation, at most 95% of a group; other groups stay whole and the target is planned without them)."""
    roots = set(trainable_roots(model, graph))
    scores = {g.root: torch.arange(g.size, dtype=torch.float64) for g in graph.groups if g.root in roots}
    plan, _ = plan_for_target(scores, CostModel(model, graph, inputs=inputs), target,
                              AllocationConfig("uniform", max_per_layer=0.95))
    out = {}
    for g in graph.groups:
        gone = set(plan.removed.get(g.root, ()))
        out[g.root] = sum(1 for u in g.units if set(u) <= gone)
    return out


@dataclass
class _Group:
    group: ChannelGroup
    remove: int  # units the target removes
    channel_unit: torch.Tensor  # channel -> its unit
    slices: list[tuple[nn.Parameter, ParamSlice]]

    @property
    def units(self) -> int:
        return len(self.group.units)


class GroupUnits:
    """Every prunable group's units, how many go, and their producing slices (see the module docstring).

    Args:
        model: The network (its parameters are read live, so norms follow training).
        graph: Its channel graph.
        counts: Units removed per group root (groups with 0, or whose producers are not module parameters, are
            left dense).
    """

    def __init__(self, model: nn.Module, graph: ChannelGraph, counts: dict[str, int]) -> None:
        params = dict(model.named_parameters())
        self.modules = dict(model.named_modules())
        self.groups: dict[str, _Group] = {}
        for g in graph.groups:
            producers = producer_slices(g)
            if counts.get(g.root, 0) < 1 or any(s.name not in params for s in producers):
                continue
            unit_of = torch.empty(g.size, dtype=torch.long)
            for u, channels in enumerate(g.units):
                unit_of[list(channels)] = u
            self.groups[g.root] = _Group(g, counts[g.root], unit_of, [(params[s.name], s) for s in producers])
        if not self.groups:
            raise ValueError("the target removes no unit from any prunable group (a milder model or a lower target "
                             "fraction, or fewer ignore=[...])")

    def total(self) -> int:
        """Units the target removes over all groups."""
        return sum(g.remove for g in self.groups.values())

    def _per_unit(self, g: _Group, per_slice: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        channels = None
        for param, s in g.slices:
            rows = param.index_select(s.dim, s.idxs.to(param.device)).movedim(s.dim, 0).reshape(len(s.idxs), -1)
            values = torch.zeros(g.group.size, dtype=rows.dtype, device=rows.device)
            values = values.index_add(0, s.root_idxs.to(rows.device), per_slice(rows))
            channels = values if channels is None else channels + values
        units = torch.zeros(g.units, dtype=channels.dtype, device=channels.device)
        return units.index_add(0, g.channel_unit.to(channels.device), channels)

    @torch.no_grad()
    def l1(self) -> dict[str, torch.Tensor]:
        """Per group, each unit's L1 norm over its producing slices (float64, CPU): the ranking criterion."""
        return {root: self._per_unit(g, lambda rows: rows.abs().sum(1)).double().cpu()
                for root, g in self.groups.items()}

    def squared_norms(self) -> dict[str, torch.Tensor]:
        """Per group, each unit's squared L2 norm over its producing slices, differentiable."""
        return {root: self._per_unit(g, lambda rows: rows.pow(2).sum(1)) for root, g in self.groups.items()}

    def ranks(self) -> dict[str, torch.Tensor]:
        """Per group, each unit's rank by L1 norm, ascending: 0 is the least important."""
        out = {}
        for root, norms in self.l1().items():
            order = torch.argsort(norms, stable=True)
            rank = torch.empty_like(order)
            rank[order] = torch.arange(len(order))
            out[root] = rank
        return out

    def plan(self, removed_units: dict[str, list[int]]) -> ChannelPlan:
        """The channel plan removing the given units of each group."""
        return ChannelPlan({root: tuple(c for u in units for c in self.groups[root].group.units[u])
                            for root, units in removed_units.items() if units})

    @torch.no_grad()
    def zero_units_(self, removed_units: dict[str, list[int]]) -> None:
        """Zero the producing slices of the given units (they then contribute nothing downstream)."""
        for root, units in removed_units.items():
            g = self.groups[root]
            gone = torch.zeros(g.units, dtype=torch.bool)
            gone[list(units)] = True
            for param, s in g.slices:
                hit = s.idxs[gone[g.channel_unit[s.root_idxs]]]
                if len(hit):
                    param.index_fill_(s.dim, hit.to(param.device), 0.0)


def rank_increment(ranks: torch.Tensor, remove: int, amplitude: float, shape: str, u: float = 0.25) -> torch.Tensor:
    """Per-unit increment from its rank ``r`` (0 = least important; fractional for averaged ranks) when ``remove``
    = m of N units go.

    ``"linear"`` (IncReg, Wang et al. 2018, arXiv 1804.09461): ``A (1 - r/m)`` for ``r < m``, ``-A (r - m)/(N - m)``
    above: the least important rise fastest, the kept ones fall. ``"exponential"`` (SPP's centrosymmetric function,
    Wang et al. 2017, arXiv 1709.06994, in the form of its authors' released solver): ``A exp(-a r)`` up to
    ``N_c = -ln(u) / a`` and ``2uA - A exp(-a (2 N_c - r))`` above, with ``a = ln(2/u) / m``: continuous,
    point-symmetric about ``(N_c, uA)``, zero exactly at ``r = m``, clipped at ``-A`` far above it.
    """
    r = ranks.double()
    n = len(r)
    if not 0 < remove < n:
        raise ValueError(f"remove must be in [1, {n - 1}] for {n} units, got {remove}")
    if shape == "linear":
        return torch.where(r < remove, amplitude * (1 - r / remove), -amplitude * (r - remove) / max(n - remove, 1))
    if shape == "exponential":
        if not 0 < u < 0.5:
            raise ValueError(f"u must be in (0, 0.5), got {u!r}")
        a = math.log(2 / u) / remove
        centre = -math.log(u) / a
        below = amplitude * torch.exp(-a * r)
        above = 2 * u * amplitude - amplitude * torch.exp(-a * (2 * centre - r))
        return torch.where(r <= centre, below, above).clamp_min(-amplitude)
    raise ValueError(f"unknown increment shape {shape!r}; accepted: 'linear', 'exponential'")


def train_then_remove_(model: nn.Module, data, units: GroupUnits, hooks, epochs: int, choose: Callable[[], dict],
                       ctx: RunContext, *, method: str, bn_images: int, finetune_epochs: int,
                       ignore: tuple[str, ...] = ()) -> tuple[PruneRecord, ChannelPlan]:
    """Train ``model`` with ``hooks`` for ``epochs`` (last epoch kept: the method's state follows the weights),
    zero the units ``choose()`` returns (root -> unit indices) and remove them (the shrink is checked against the
    zeroed network: outputs equal to 1e-5), re-estimate BatchNorm on ``bn_images`` and fine-tune ``finetune_epochs``
    (best epoch on validation). Returns the record and the removal plan."""
    from prunekit.measurement.metrics import count_flops, count_params
    from prunekit.recovery.batchnorm import recalibrate_batchnorm_
    from prunekit.training import evaluate, fit

    record = PruneRecord(method=method)
    train = replace(ctx.train, seed=ctx.seed)
    loss_before = evaluate(model, data.train)["loss"]
    commit = ctx.subfolder("training")
    resume = ctx.resume and commit is not None and (commit / "train_state.pt").is_file()
    history = fit(model, data, replace(train, epochs=epochs), commit, progress=ctx.progress, hooks=hooks,
                  resume=resume, log=ctx.log, select_best=False).history
    loss_trained = evaluate(model, data.train)["loss"]  # the same measure as before: no augmentation
    removed = choose()
    plan = units.plan(removed)
    flops_inputs = data.flops_inputs()
    dense_flops, dense_params = count_flops(model, flops_inputs), count_params(model)
    units.zero_units_(removed)
    ChannelGraph(model, data.example_inputs(), ignore=ignore).shrink_(plan)
    recalibrate_batchnorm_(model, data, bn_images)
    change = plan.to_dict()
    if ignore:
        change["ignore"] = list(ignore)
    record.changes = [change]
    record.val_acc_before_finetune = data.accuracy(model, "val")
    record.test_acc_before_finetune = data.accuracy(model, "test")
    ctx.log(f"{method}: removed {sum(map(len, removed.values()))} units, keeps "
            f"{count_flops(model, flops_inputs) / dense_flops:.3f} of FLOPs and "
            f"{count_params(model) / dense_params:.3f} of params; val acc {record.val_acc_before_finetune:.4f}")
    if finetune_epochs:
        folder = ctx.subfolder("finetune")
        fit(model, data, replace(train, epochs=finetune_epochs), folder, progress=ctx.progress, log=ctx.log,
            resume=ctx.resume and folder is not None and (folder / "train_state.pt").is_file(),
            metadata={"model": ctx.base, "architecture_changes": record.changes} if ctx.base else None)
    loss_after = evaluate(model, data.train)["loss"]
    record.rounds = history
    record.results = {"train_loss_before": loss_before, "train_loss_after_training": loss_trained,
                      "train_loss_after": loss_after,
                      "removed_units": {root: len(u) for root, u in removed.items()}}
    return record, plan
