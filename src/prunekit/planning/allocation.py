"""How much to remove where, for every unit a method removes, under one target: keep a fraction of the FLOPs,
the parameters, the channels or the measured latency (:class:`Target`), with a uniform per-layer fraction or one
global ranking (:class:`Allocation`) and a per-layer cap.

* channels (coupled groups, removed physically): :func:`plan_for_target`, costed exactly by :class:`CostModel`
  from the slices a plan removes, so the search needs no surgery (latency: predicted by a measured
  :class:`~prunekit.measurement.latency_table.LatencyTable` from the widths the plan leaves);
* weights and their structured units (ADMM's entries, filters, channels, columns): :func:`allocate_rates`,
  one magnitude threshold over all layers' units weighted by the weights they hold, or :func:`sensitivity_rates`,
  per-layer fractions from each layer's own validation loss when it alone is pruned;
* k-of-n runs (N:M sparsity, DPP and ADMM): :func:`plan_k_of_n`, one keep ratio shared by the layers that carry
  the weights, each with the densest k-of-n at or under it;
* ranked directions with a non-additive cost (EigenDamage's eigen-directions): :func:`remove_lowest`, a global
  threshold that updates the cost of the layer it touches after every removal.

Every cost is measured the way :func:`~prunekit.measurement.metrics.count_flops` and
:func:`~prunekit.measurement.metrics.count_params` measure a model.
"""

from __future__ import annotations

import enum
import heapq
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from prunekit.channels.graph import ChannelGraph, ChannelPlan
from prunekit.configs import Config, coerce_fields
from prunekit.measurement.latency_table import LatencySettings, LatencyTable, LayerState, model_states
from prunekit.measurement.metrics import count_flops, count_params, flops_by_module
from prunekit.planning.pattern import Pattern


class TargetMetric(str, enum.Enum):
    """What a target keeps a fraction of."""

    FLOPS = "flops"
    PARAMS = "params"
    CHANNELS = "channels"
    LATENCY = "latency"  # measured on this machine (a latency table): latency=x2 halves it


class Allocation(str, enum.Enum):
    """Per-layer uniform fraction, one global ranking of (per-layer normalised) scores, or per-layer fractions
    from each layer's own validation sensitivity (:func:`sensitivity_rates`; weight patterns)."""

    UNIFORM = "uniform"
    GLOBAL = "global"
    SENSITIVITY = "sensitivity"


CHANNEL_ALLOCATIONS = (Allocation.UNIFORM, Allocation.GLOBAL)


@dataclass(frozen=True)
class Target:
    """Keep ``keep`` (0 < keep < 1) of ``metric``; ``Target.parse("flops=0.25")`` keeps a quarter of the FLOPs,
    ``Target.parse("latency=x2")`` half the latency predicted by a table measured on this machine."""

    metric: TargetMetric
    keep: float

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "metric", TargetMetric(self.metric))
        except ValueError:
            raise ValueError(f"target metric must be one of {[m.value for m in TargetMetric]}, "
                             f"got {self.metric!r}") from None
        if not isinstance(self.keep, (int, float)) or not 0 < self.keep < 1:
            raise ValueError(f"target keep fraction must be in (0, 1), got {self.keep!r} "
                             "(e.g. flops=0.25 keeps a quarter of the FLOPs)")

    @classmethod
    def parse(cls, text: str) -> Target:
        """``"flops=0.25"``, ``"params=0.5"``, ``"channels=0.7"``; also ``"flops=x4"`` (keep 1/4), ``"latency=x2"``."""
        metric, sep, value = str(text).strip().lower().partition("=")
        if not sep:
            raise ValueError(f"target must look like METRIC=FRACTION (flops=0.25, params=0.5, channels=0.7) or "
                             f"METRIC=xFACTOR (flops=x4, latency=x2), got {text!r}")
        try:
            keep = 1.0 / float(value[1:]) if value.startswith("x") else float(value)
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"target value must be a fraction like 0.25 or a factor like x4, got {value!r}") from None
        return cls(metric.strip().lower(), keep)

    def __str__(self) -> str:
        return f"{self.metric.value}={self.keep:g}"

    def to_text(self) -> str:
        """The exact text form (``Target.parse(t.to_text()) == t``)."""
        return f"{self.metric.value}={self.keep!r}"

    def to_dict(self) -> dict:
        return {"metric": self.metric.value, "keep": self.keep}

    @property
    def slug(self) -> str:
        """A folder name for the target: ``flops-0.25``."""
        return str(self).replace("=", "-")


@dataclass(frozen=True)
class AllocationConfig(Config):
    """Allocation settings.

    Args:
        allocation: :class:`Allocation` strategy.
        max_per_layer: Largest fraction of a group's channels that may be removed (at least one always stays).
        tolerance: Relative distance to the target that counts as reached (0.02 = within 2%).
        round_to: Keep a multiple of this many channels in every group (of untied channels) that is pruned:
            CPU and GPU kernels run faster on widths that are multiples of 8 or 16. A group of ``round_to``
            channels or fewer stays whole; a value at least as wide as every group is refused. Default: 1, or
            under a ``latency=`` target the one of 1, 4, 8 and 16 whose plan reaches the measured speed removing
            the least importance.
        latency: Engine, batch and threads a ``latency=`` target is measured with.
    """

    allocation: Allocation = field(default=Allocation.GLOBAL, metadata={"choices": CHANNEL_ALLOCATIONS})
    max_per_layer: float = 0.9
    tolerance: float = 0.02
    round_to: int | None = None
    latency: LatencySettings = LatencySettings()

    def __post_init__(self) -> None:
        coerce_fields(self)
        if not isinstance(self.max_per_layer, (int, float)) or not 0 < self.max_per_layer < 1:
            raise ValueError(f"max_per_layer must be in (0, 1), got {self.max_per_layer!r}")
        if not 0 < self.tolerance < 0.5:
            raise ValueError(f"tolerance must be in (0, 0.5), got {self.tolerance!r}")
        if self.round_to is not None and (isinstance(self.round_to, bool) or not isinstance(self.round_to, int)
                                          or self.round_to < 1):
            raise ValueError(f"round_to must be a positive int, got {self.round_to!r}")

    def rounding(self) -> int:
        """The multiple kept widths are rounded to when one plan is made: ``round_to``, else 1."""
        return 1 if self.round_to is None else self.round_to


LATENCY_METHODS = "the channel criteria (l1, l2, bn, taylor, random), the curvature methods (c-obd, c-obs, kron-obd, " \
    "kron-obs) and eigendamage"


def refuse_latency_target(target: Target | None, method: str) -> None:
    """Refuse a ``latency=`` target for a method whose allocation has no latency cost model.

    Raises:
        ValueError: naming the methods that take one.
    """
    if isinstance(target, Target) and target.metric is TargetMetric.LATENCY:
        raise ValueError(f"{method} does not take latency= targets (it spends a FLOPs or parameter budget); they "
                         f"cover {LATENCY_METHODS}; give {method} a flops= or params= target")


def check_latency_settings_use(target: Target, settings: LatencySettings) -> None:
    """Refuse latency settings (``--engine``, ``--batch``, ...) given with a target they do not apply to.

    Raises:
        ValueError: non-default settings with a flops=, params= or channels= target.
    """
    default = LatencySettings().to_dict()
    if target.metric is not TargetMetric.LATENCY and settings.to_dict() != default:
        changed = [k for k, v in settings.to_dict().items() if v != default[k]]
        raise ValueError(f"the latency settings ({', '.join(changed)}: --engine, --batch, --latency-*) apply to "
                         f"latency= targets only, and this target is {target}; drop them or give --target latency=x2")



class InfeasibleTargetError(ValueError):
    """The target cannot be reached under the per-layer cap."""


class CostModel:
    """Exact parameters / FLOPs of the model a plan would produce, from the removed slices alone, and its latency
    predicted by a measured table.

    A weight keeps ``prod_d (1 - removed_d / size_d)`` of its entries; a convolution or linear layer keeps the same
    fraction of its FLOPs. An attention block's own FLOPs beyond its linear layers (the ``q k^T`` and ``a v``
    products; all of an ``nn.MultiheadAttention``, whose projections are not module calls) scale with the heads it
    keeps; FLOPs of other ops are counted as unchanged. Latency: the table's prediction with every layer at the
    input and output widths the plan leaves it, over its prediction for the model as it is.
    """

    def __init__(self, model: nn.Module, graph: ChannelGraph, input_shape: tuple[int, ...] | None = None,
                 inputs: Any = None, latency: LatencyTable | None = None) -> None:
        """FLOPs are counted on ``inputs`` (a shape with its batch dimension, or example inputs), else on one
        example of ``input_shape`` (the batch dimension is added), else on the graph's example inputs (a model
        taking keyword inputs, such as a Hugging Face transformer). ``latency``: the table of the dense network
        (needed for latency= targets)."""
        self.graph = graph
        self.latency = latency
        if latency is not None:
            self.states = model_states(model, latency.layers)
            self._current_ms: dict[int, float] = {}  # the model as it is, per rounding's fit
        self.dense_params = count_params(model)
        if inputs is None:
            inputs = graph.example_inputs if input_shape is None else (1, *input_shape)
        self.dense_flops = count_flops(model, inputs)
        per_module = flops_by_module(model, inputs)
        self.weight_flops: dict[str, int] = {}
        for name, module in model.named_modules():
            if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.Linear)) \
                    and name in per_module:
                self.weight_flops[f"{name}.weight"] = per_module[name]
        self.shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        self.total_channels = sum(g.size for g in graph.groups)
        self.head_flops: dict[str, int] = {}  # head group root -> FLOPs that scale with its kept heads
        for g in graph.groups:
            if g.heads is not None and g.heads.module in per_module:
                inner = sum(f for n, f in per_module.items() if n.startswith(f"{g.heads.module}.")
                            and f"{n}.weight" in self.weight_flops)
                self.head_flops[g.root] = per_module[g.heads.module] - inner

    def removed_per_dim(self, plan: ChannelPlan) -> dict[str, dict[int, float]]:
        out: dict[str, dict[int, float]] = {}
        for root, idxs in plan.removed.items():
            group = self.graph.by_root[root]
            removed = torch.zeros(group.size, dtype=torch.bool)
            removed[list(idxs)] = True
            for s in group.slices():
                hit = int(removed[s.root_idxs].sum())
                if hit:
                    dims = out.setdefault(s.name, {})
                    dims[s.dim] = dims.get(s.dim, 0) + s.removed_count(hit)
        return out

    def cost(self, plan: ChannelPlan, metric: TargetMetric, round_to: int = 1) -> float:
        """Fraction of ``metric`` the planned model keeps (latency: by the table's fit for widths rounded to
        ``round_to``, the rounding the plan was made with)."""
        if metric is TargetMetric.CHANNELS:
            return 1.0 - plan.num_removed() / max(self.total_channels, 1)
        removed = self.removed_per_dim(plan)
        if metric is TargetMetric.LATENCY:
            if self.latency is None:
                raise ValueError("a latency= target needs the network's measured latency table "
                                 "(CostModel(..., latency=latency_table(model, example, settings)))")
            states = dict(self.states)
            for name, state in self.states.items():
                dims = removed.get(f"{name}.weight")
                if dims and not state.bottleneck:
                    states[name] = LayerState(state.kept_in - dims.get(1, 0), state.kept_out - dims.get(0, 0))
            if round_to not in self._current_ms:
                self._current_ms[round_to] = self.latency.predict(self.states, round_to)
            return self.latency.predict(states, round_to) / self._current_ms[round_to]
        if metric is TargetMetric.PARAMS:
            lost = 0.0
            for name, dims in removed.items():
                shape = self.shapes[name]
                lost += math.prod(shape) * (1.0 - _kept_fraction(shape, dims))
            return (self.dense_params - lost) / self.dense_params
        lost = 0.0
        for name, flops in self.weight_flops.items():
            if name in removed:
                lost += flops * (1.0 - _kept_fraction(self.shapes[name], removed[name]))
        for root, flops in self.head_flops.items():
            lost += flops * len(plan.removed.get(root, ())) / self.graph.by_root[root].size
        return (self.dense_flops - lost) / self.dense_flops


def _kept_fraction(shape: tuple[int, ...], dims: dict[int, float]) -> float:
    frac = 1.0
    for d, r in dims.items():
        frac *= max(0.0, 1.0 - r / shape[d])
    return frac


def plan_for_target(scores: dict[str, torch.Tensor], cost: CostModel, target: Target,
                    config: AllocationConfig = AllocationConfig(), round_to: int | None = None
                    ) -> tuple[ChannelPlan, float]:
    """The plan removing the lowest-scored channels that meets ``target``, and the fraction it keeps.

    Channels tied together (a grouped convolution's positions) are ranked and removed as one unit scored by the
    sum of its channels. Global allocation ranks units of all groups by their score divided by the group's mean.

    Kept widths are rounded to ``round_to`` if given, else to ``config.round_to`` (else 1). Under a ``latency=``
    target each plan is costed by the table's fit for its rounding; the methods choose the rounding by building
    and timing each one's plan (:func:`prunekit.methods.rounds.measured_rounding_choice`).

    Raises:
        InfeasibleTargetError: even removing ``max_per_layer`` of every group keeps too much.
    """
    round_to = config.rounding() if round_to is None else round_to
    units = {root: (cost.graph.by_root[root].units if root in cost.graph.by_root
                    else [(i,) for i in range(len(s))]) for root, s in scores.items()}
    unit_scores = {root: torch.stack([scores[root][list(u)].sum() for u in units[root]]) for root in scores}
    groups = {root: us for root, us in unit_scores.items() if len(us) > 1}
    caps = {root: min(len(us) - 1, int(math.floor(config.max_per_layer * len(us)))) for root, us in groups.items()}
    selector = _UnitSelector(units, {root: torch.argsort(us, stable=True) for root, us in groups.items()}, round_to)
    if groups and round_to > 1 and all(len(us) <= round_to for us in groups.values()):
        widest = max(len(us) for us in groups.values())
        raise InfeasibleTargetError(
            f"round_to={round_to} is at least the width of every prunable group (the widest has {widest}), "
            f"so no group can keep a smaller multiple of it; pick --round-to below {widest}")

    if config.allocation is Allocation.UNIFORM:
        steps = sorted({k / len(us) for us in groups.values() for k in range(len(us) + 1)})
        candidates = [selector.plan({r: min(caps[r], int((f + 1e-12) * len(groups[r]))) for r in groups})
                      for f in steps if f <= config.max_per_layer + 1e-12]
    else:
        ranked = []
        for root, us in groups.items():
            norm = _normalized(us)
            for rank, unit in enumerate(selector.orders[root].tolist()):
                if rank < caps[root]:
                    ranked.append((float(norm[unit]), root))
        ranked.sort(key=lambda e: e[0])  # stable: a group's units stay in their own order
        candidates = _PrefixPlans(ranked, selector)

    def keep_of(i: int) -> float:
        return cost.cost(candidates[i], target.metric, round_to)

    if keep_of(len(candidates) - 1) > target.keep * (1 + config.tolerance):
        best = keep_of(len(candidates) - 1)
        raise InfeasibleTargetError(
            f"target {target} is infeasible with max_per_layer={config.max_per_layer}: removing the most allowed "
            f"still keeps {best:.3f} of the {target.metric.value}; raise --max-per-layer, pick a milder target or "
            "prune more layers (fewer ignore=[...])")
    lo, hi = 0, len(candidates) - 1  # find the first candidate whose kept fraction is <= target
    while lo < hi:
        mid = (lo + hi) // 2
        if keep_of(mid) <= target.keep:
            hi = mid
        else:
            lo = mid + 1
    best = lo
    if lo > 0 and abs(keep_of(lo - 1) - target.keep) < abs(keep_of(lo) - target.keep):
        best = lo - 1
    plan, kept = candidates[best], keep_of(best)
    if abs(kept / target.keep - 1) > config.tolerance:
        plan, kept = _refine(plan, kept, selector, caps, cost, target, round_to)
    return plan, kept


def removed_importance(scores: dict[str, torch.Tensor], plan: ChannelPlan) -> float:
    """What a plan removes, in the units global allocation ranks by: the removed channels' scores over their
    group's mean, summed."""
    return sum(float(_normalized(scores[root])[list(idxs)].sum()) for root, idxs in plan.removed.items())


def _normalized(scores: torch.Tensor) -> torch.Tensor:
    """Scores over their mean (ranks when the mean is not positive): what global allocation compares."""
    return scores / scores.mean() if scores.mean() > 0 else torch.argsort(torch.argsort(scores)).double()


class _UnitSelector:
    """Turns "remove the k lowest units of each group" into a channel plan."""

    def __init__(self, units: dict[str, list[tuple[int, ...]]], orders: dict[str, torch.Tensor],
                 round_to: int = 1) -> None:
        self.units, self.orders, self.round_to = units, orders, round_to

    def channels(self, root: str, k: int) -> tuple[int, ...]:
        n = len(self.units[root])
        if self.round_to > 1 and k and n == len(self.orders[root]):
            # keep a multiple of round_to: remove fewer (never more) than asked, so targets stay monotone; a group
            # of round_to units or fewer has no smaller multiple to keep, so it stays whole
            k = n - min(n, -(-(n - k) // self.round_to) * self.round_to)
        return tuple(sorted(c for u in self.orders[root][:k].tolist() for c in self.units[root][u]))

    def plan(self, counts: dict[str, int]) -> ChannelPlan:
        return ChannelPlan({r: self.channels(r, k) for r, k in counts.items() if k})


class _PrefixPlans:
    """Lazy sequence: plan ``k`` removes the first ``k`` units of a global ranking."""

    def __init__(self, ranked: list[tuple[float, str]], selector: _UnitSelector) -> None:
        self.ranked, self.selector = ranked, selector

    def __len__(self) -> int:
        return len(self.ranked) + 1

    def __getitem__(self, k: int) -> ChannelPlan:
        counts: dict[str, int] = {}
        for _, root in self.ranked[:k]:
            counts[root] = counts.get(root, 0) + 1
        return self.selector.plan(counts)


def _refine(plan: ChannelPlan, kept: float, selector: _UnitSelector, caps: dict[str, int], cost: CostModel,
            target: Target, round_to: int = 1, max_moves: int = 200) -> tuple[ChannelPlan, float]:
    """Greedy single-unit moves (remove the next-lowest unit of a group, or put back its last removed one) while
    they bring the kept fraction closer to the target: coarse layers make the ranking overshoot."""
    removed_units = {r: 0 for r in selector.orders}
    for r, idxs in plan.removed.items():
        removed_units[r] = sum(1 for u in selector.units[r] if u[0] in set(idxs))
    for _ in range(max_moves):
        best_move, best_gap, best_value = None, abs(kept - target.keep), kept
        for r in selector.orders:
            for delta in {1, -1, selector.round_to, -selector.round_to}:
                n = removed_units[r] + delta
                if not 0 <= n <= caps[r]:
                    continue
                value = cost.cost(selector.plan({**removed_units, r: n}), target.metric, round_to)
                if abs(value - target.keep) < best_gap - 1e-12:
                    best_move, best_gap, best_value = (r, n), abs(value - target.keep), value
        if best_move is None:
            break
        removed_units[best_move[0]] = best_move[1]
        kept = best_value
        if abs(kept / target.keep - 1) <= 0.005:
            break
    return selector.plan(removed_units), kept


# --------------------------------------------------------------------------------------------------- weights


def unit_scores(weight: torch.Tensor, pattern: Pattern) -> tuple[torch.Tensor, int]:
    """Magnitude score of each unit of ``pattern`` in a weight (entries; rows, input channels or columns by their
    root-mean-square weight) and the weights one unit holds."""
    w = weight.detach()
    mat = w.reshape(w.shape[0], -1)
    if pattern is Pattern.UNSTRUCTURED:
        return mat.abs().reshape(-1), 1
    if pattern is Pattern.FILTER:
        return mat.pow(2).sum(1).div(mat.shape[1]).sqrt(), mat.shape[1]
    if pattern is Pattern.CHANNEL:
        per = w.transpose(0, 1).reshape(w.shape[1], -1)
        return per.pow(2).mean(1).sqrt(), per.shape[1]
    if pattern is Pattern.COLUMN:
        return mat.pow(2).mean(0).sqrt(), mat.shape[0]
    raise ValueError(f"per-weight allocation covers unstructured, filter, channel and column units, not "
                     f"{pattern.value}")


def allocate_rates(weights: dict[str, torch.Tensor], pattern: Pattern, keep: float,
                   allocation: Allocation = Allocation.GLOBAL, fixed: dict[str, float] | None = None,
                   costs: dict[str, float] | None = None) -> dict[str, float]:
    """Per-layer keep fractions of ``pattern``'s units that keep ``keep`` of all the weights' cost.

    Layers named in ``fixed`` keep their given fraction. The others get ``keep`` each (uniform) or share one
    global magnitude threshold over all their units, each unit weighted by its cost (global): the weights it holds
    times its layer's cost per weight in ``costs`` (default 1: a parameters target; FLOPs per weight for a FLOPs
    target, :func:`weight_costs`). Every layer keeps at least one unit.

    Raises:
        ValueError: ``fixed`` names a layer not in ``weights``.
    """
    fixed = dict(fixed or {})
    unknown = [n for n in fixed if n not in weights]
    if unknown:
        raise ValueError(f"rates name layers that are not constrained: {unknown}; constrained: {list(weights)}")
    rates = {n: float(fixed[n]) for n in weights if n in fixed}
    free = [n for n in weights if n not in fixed]
    if not free:
        return rates
    if allocation is Allocation.UNIFORM:
        return {**rates, **{n: keep for n in free}}
    scores, sizes = [], []
    for name in free:
        s, size = unit_scores(weights[name], pattern)
        scores.append(s.double().cpu())
        sizes.append(torch.full_like(scores[-1], float(size) * (costs[name] if costs else 1.0)))
    all_scores, all_sizes = torch.cat(scores), torch.cat(sizes)
    order = torch.argsort(all_scores, descending=True)
    budget = keep * float(all_sizes.sum())
    kept_entries = torch.cumsum(all_sizes[order], 0)
    n_keep = int((kept_entries <= budget).sum().clamp_min(1))
    kept = torch.zeros(len(order), dtype=torch.bool)
    kept[order[:n_keep]] = True
    start = 0
    for name, s in zip(free, scores):
        frac = float(kept[start:start + len(s)].double().mean())
        rates[name] = max(frac, 1.0 / len(s))
        start += len(s)
    return rates


SENSITIVITY_GRID = (0.5, 0.3, 0.2, 0.1, 0.05, 0.03, 0.02, 0.01, 0.005, 0.002, 0.001)


def sensitivity_rates(weights: dict[str, torch.Tensor], pattern: Pattern, keep: float,
                      loss_with: Callable[[str, float], float], fixed: dict[str, float] | None = None,
                      costs: dict[str, float] | None = None, grid: tuple[float, ...] = SENSITIVITY_GRID
                      ) -> dict[str, float]:
    """Per-layer keep fractions that keep ``keep`` of all the weights' cost where the validation loss suffers least.

    Sensitivity analysis (Han et al. 2015, arXiv 1506.02626): ``loss_with(layer, f)`` is the validation loss with
    that layer alone pruned to keep ``f`` of its units. Every free layer starts dense and steps down ``grid``;
    each step goes to the layer whose next step costs the least loss per unit of cost removed,
    ``(L_l(f') - L_l(f)) / ((f - f') c_l)``, until the budget is met (the last step is cut short so the total is
    exact). Unlike one global magnitude threshold, a large layer whose every weight matters is not starved. Every
    layer keeps at least one unit; layers in ``fixed`` keep their fraction.

    Raises:
        InfeasibleTargetError: the budget is below one unit per layer.
        ValueError: ``fixed`` names a layer not in ``weights``.
    """
    rates = allocate_rates(weights, pattern, keep, Allocation.UNIFORM, fixed, costs)  # checks ``fixed``
    free = [n for n in weights if n not in (fixed or {})]
    if not free:
        return rates
    rates.update({n: 1.0 for n in free})
    size = {n: weights[n].numel() * (costs[n] if costs else 1.0) for n in weights}
    budget = keep * sum(size.values()) - sum(rates[n] * size[n] for n in weights if n not in free)
    floor = {n: unit_scores(weights[n], pattern)[1] / weights[n].numel() for n in free}
    if budget < sum(floor[n] * size[n] for n in free) - 1e-9:
        raise InfeasibleTargetError(f"keeping {keep:g} of the weights leaves less than one {pattern.value} unit per "
                                    "layer; raise the target")
    levels = {n: [1.0] + [g for g in grid if g > floor[n]] + ([floor[n]] if floor[n] < 1 else []) for n in free}
    base = loss_with(free[0], 1.0)  # nothing pruned
    loss = {n: [base] + [loss_with(n, f) for f in levels[n][1:]] for n in free}
    at = {n: 0 for n in free}
    kept = sum(size[n] for n in free)
    while kept > budget + 1e-9:
        def price(n: str) -> float:
            i = at[n]
            return (loss[n][i + 1] - loss[n][i]) / ((levels[n][i] - levels[n][i + 1]) * size[n])

        name = min((n for n in free if at[n] + 1 < len(levels[n])), key=price)
        i = at[name]
        step = (levels[name][i] - levels[name][i + 1]) * size[name]
        if kept - step <= budget:  # the last step, cut short
            rates[name] = levels[name][i] - (kept - budget) / size[name]
            break
        at[name], kept = i + 1, kept - step
        rates[name] = levels[name][i + 1]
    return rates


# ---------------------------------------------------------------------------------------------- k-of-n runs


def nearest_k_of_n(row: int, k: int, n: int) -> tuple[int, int]:
    """The ``(k', n')`` closest to keeping ``k / n`` for a row of length ``row``: ``n'`` is the divisor of ``row``
    nearest to ``n`` (the larger one on a tie) and ``k' = max(1, round(k * n' / n))`` (``k' < n'``)."""
    divisors = [d for d in range(2, row + 1) if row % d == 0]
    if not divisors:
        raise ValueError(f"a row of length {row} cannot hold a k-of-n pattern")
    best = min(divisors, key=lambda d: (abs(d - n), -d))
    return min(max(1, round(k * best / n)), best - 1), best


def k_of_n_for_keep(row: int, keep: float, max_n: int = 32) -> tuple[int, int]:
    """The largest ``k / n <= keep`` with ``n`` dividing ``row`` and ``n <= max_n`` (hardware run lengths stay
    short; on a tie the shorter run wins), so the layer is never less sparse than asked; when even ``1 / n`` is
    above ``keep``, the sparsest ``1 / n`` there is."""
    if not 0 < keep < 1:
        raise ValueError(f"keep must be in (0, 1), got {keep!r}")
    candidates = [(k, n) for n in range(2, min(row, max_n) + 1) if row % n == 0 for k in range(1, n)]
    if not candidates:
        raise ValueError(f"a row of length {row} has no divisor in [2, {max_n}] for a k-of-n pattern")
    below = [kn for kn in candidates if kn[0] / kn[1] <= keep + 1e-12]
    if not below:
        return min(candidates, key=lambda kn: (kn[0] / kn[1], kn[1]))
    return max(below, key=lambda kn: (kn[0] / kn[1], -kn[1]))


def weight_costs(model: nn.Module, layers: Iterable[str], input_shape: tuple[int, ...]) -> dict[str, float]:
    """FLOPs per weight of each layer (its FLOPs over its weight's entries, :func:`count_flops`' counting), so
    that a budget over weights can be spent in FLOPs."""
    per_module = flops_by_module(model, (1, *input_shape))
    modules = dict(model.named_modules())
    return {name: per_module.get(name, 0) / modules[name].weight.numel() for name in layers}


def plan_k_of_n(weights: dict[str, torch.Size | tuple[int, ...]], sparsity: float, dense_below: float = 0.02,
                max_n: int = 32, costs: dict[str, float] | None = None) -> dict[str, tuple[int, int]]:
    """Per-layer ``(k, n)`` reaching about ``sparsity`` of all the weights overall (of their FLOPs, with ``costs``
    the FLOPs per weight of each layer, :func:`weight_costs`).

    Layers holding less than ``dense_below`` of the weights (a LeNet's first convolution and classifier: about 1%
    of its weights, where one kept weight in ten costs the most accuracy) stay dense and are left out of the
    result; the others share the remaining budget at one keep ratio, each with the densest k-of-n at or under it
    (:func:`k_of_n_for_keep`). Common practice for N:M sparsity, and it applies to any method alike.

    Raises:
        ValueError: ``sparsity`` is not in (0, 1), or the dense layers alone hold more than the budget.
    """
    if not 0 < sparsity < 1:
        raise ValueError(f"sparsity must be in (0, 1), got {sparsity!r}")
    sizes = {name: math.prod(shape) for name, shape in weights.items()}
    total = sum(sizes.values())
    pruned = {name for name, size in sizes.items() if size >= dense_below * total}
    cost = {name: sizes[name] * (costs[name] if costs else 1) for name in sizes}
    dense = sum(cost.values()) - sum(cost[name] for name in pruned)
    budget = (1 - sparsity) * sum(cost.values()) - dense
    if not pruned or budget <= 0:
        what = "FLOPs" if costs else "weights"
        raise ValueError(f"the layers kept dense (under {dense_below:.0%} of the weights each) hold {dense:.0f} of "
                         f"{sum(cost.values()):.0f} {what}, more than {1 - sparsity:.1%} allows; keep more (a larger "
                         "target)")
    keep = budget / sum(cost[name] for name in pruned)
    return {name: k_of_n_for_keep(math.prod(weights[name][1:]), keep, max_n) for name in weights if name in pruned}


# ------------------------------------------------------------------------------ ranked directions, any cost


@dataclass
class RankedLayer:
    """A layer whose units on each side (for a bottleneck: input and output directions) are ranked by score.

    Args:
        name: Layer name.
        scores: One score per unit, for each side.
        cost: The layer's cost given how many units of each side it keeps, once at least one was removed.
        current: Its cost as it is now (what it costs while nothing of it is removed).
        removable: Per side, whether removing its units can change the cost at all.
        dense: Per side, the width before any pruning: the cap counts against it, so rounds cannot compound
            (default: the current width).
    """

    name: str
    scores: tuple[torch.Tensor, ...]
    cost: Callable[[tuple[int, ...]], float]
    current: float
    removable: tuple[bool, ...] = (True, True)
    dense: tuple[int, ...] | None = None


def remove_lowest(layers: list[RankedLayer], fixed_cost: float, target_cost: float, max_per_layer: float,
                  metric: str = "cost", what: str = "units"
                  ) -> tuple[dict[str, list[set[int]]], dict[str, float], float]:
    """Remove units in ascending score order over all layers (one global threshold) until the total cost,
    ``fixed_cost`` plus every layer's, meets ``target_cost``; a side keeps at least ``1 - max_per_layer`` of its
    dense width (``RankedLayer.dense``). A layer's cost is re-evaluated after each of its removals, so costs need
    not be additive.

    Returns:
        (removed unit indices per layer and side, each layer's cost, the total cost).

    Raises:
        InfeasibleTargetError: the target is not reached within 2% under the cap.
    """
    sizes = {lay.name: [len(s) for s in lay.scores] for lay in layers}
    kept = {name: list(n) for name, n in sizes.items()}
    limits = {lay.name: [max(1, math.ceil(n * (1 - max_per_layer))) for n in (lay.dense or sizes[lay.name])]
              for lay in layers}
    by_name = {lay.name: lay for lay in layers}
    removed: dict[str, list[set[int]]] = {lay.name: [set() for _ in lay.scores] for lay in layers}
    costs = {lay.name: lay.current for lay in layers}
    total = fixed_cost + sum(costs.values())
    heap = [(float(score), lay.name, side, idx) for lay in layers for side, scores in enumerate(lay.scores)
            for idx, score in enumerate(scores.tolist())]
    heapq.heapify(heap)
    while total > target_cost and heap:
        _, name, side, idx = heapq.heappop(heap)
        if kept[name][side] <= limits[name][side] or not by_name[name].removable[side]:
            continue
        kept[name][side] -= 1
        removed[name][side].add(idx)
        new = by_name[name].cost(tuple(kept[name]))
        total += new - costs[name]
        costs[name] = new
    if total > target_cost * 1.02:
        raise InfeasibleTargetError(
            f"cannot reach {metric} {target_cost:.4g} (reached {total:.4g}) while keeping at least "
            f"{1 - max_per_layer:.0%} of every layer's dense {what}; keep more (a larger target fraction, e.g. "
            "flops=0.3 instead of 0.1) or raise max_per_layer")
    return removed, costs, total
