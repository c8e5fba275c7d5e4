"""How much to remove where: targets (keep a fraction of FLOPs, parameters or channels), per-layer uniform or
global ranking, and a per-layer cap. The cost of a plan is computed exactly from the slices it removes, so the
search needs no surgery; the result is checked after shrinking.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import torch
from torch import nn

from prunekit.channels.graph import ChannelGraph, ChannelPlan
from prunekit.measurement.metrics import count_flops, count_params, flops_by_module


class TargetMetric(str, enum.Enum):
    """What a target keeps a fraction of."""

    FLOPS = "flops"
    PARAMS = "params"
    CHANNELS = "channels"


class Allocation(str, enum.Enum):
    """Per-layer uniform fraction, or one global ranking of (per-layer normalised) scores."""

    UNIFORM = "uniform"
    GLOBAL = "global"


@dataclass(frozen=True)
class Target:
    """Keep ``keep`` (0 < keep < 1) of ``metric``; ``Target.parse("flops=0.25")`` keeps a quarter of the FLOPs."""

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
        """``"flops=0.25"``, ``"params=0.5"``, ``"channels=0.7"``; also ``"flops=x4"`` (keep 1/4)."""
        metric, sep, value = str(text).strip().lower().partition("=")
        if not sep:
            raise ValueError(f"target must look like METRIC=FRACTION (flops=0.25, params=0.5, channels=0.7) or "
                             f"METRIC=xFACTOR (flops=x4), got {text!r}")
        try:
            keep = 1.0 / float(value[1:]) if value.startswith("x") else float(value)
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"target value must be a fraction like 0.25 or a factor like x4, got {value!r}") from None
        return cls(metric.strip().lower(), keep)

    def __str__(self) -> str:
        return f"{self.metric.value}={self.keep:g}"

    def to_dict(self) -> dict:
        return {"metric": self.metric.value, "keep": self.keep}


@dataclass(frozen=True)
class AllocationConfig:
    """Allocation settings.

    Args:
        allocation: :class:`Allocation` strategy.
        max_per_layer: Largest fraction of a group's channels that may be removed (at least one always stays).
        tolerance: Relative distance to the target that counts as reached (0.02 = within 2%).
        round_to: Keep a multiple of this many channels in every group (of untied channels) that is pruned:
            CPU and GPU kernels run faster on widths that are multiples of 8 or 16. A group of ``round_to``
            channels or fewer stays whole; a value at least as wide as every group is refused.
    """

    allocation: Allocation = Allocation.GLOBAL
    max_per_layer: float = 0.9
    tolerance: float = 0.02
    round_to: int = 1

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "allocation", Allocation(self.allocation))
        except ValueError:
            raise ValueError(f"allocation must be one of {[a.value for a in Allocation]}, "
                             f"got {self.allocation!r}") from None
        if not 0 < self.max_per_layer < 1:
            raise ValueError(f"max_per_layer must be in (0, 1), got {self.max_per_layer!r}")
        if not 0 < self.tolerance < 0.5:
            raise ValueError(f"tolerance must be in (0, 0.5), got {self.tolerance!r}")
        if isinstance(self.round_to, bool) or not isinstance(self.round_to, int) or self.round_to < 1:
            raise ValueError(f"round_to must be a positive int, got {self.round_to!r}")

    def to_dict(self) -> dict:
        return {"allocation": self.allocation.value, "max_per_layer": self.max_per_layer, "tolerance": self.tolerance,
                "round_to": self.round_to}


class InfeasibleTargetError(ValueError):
    """The target cannot be reached under the per-layer cap."""


class CostModel:
    """Exact parameters / FLOPs of the model a plan would produce, from the removed slices alone.

    A weight keeps ``prod_d (1 - removed_d / size_d)`` of its entries; a convolution or linear layer keeps the same
    fraction of its FLOPs (FLOPs of other ops, such as attention products, are counted as unchanged).
    """

    def __init__(self, model: nn.Module, graph: ChannelGraph, input_shape: tuple[int, ...]) -> None:
        self.graph = graph
        self.dense_params = count_params(model)
        self.dense_flops = count_flops(model, (1, *input_shape))
        per_module = flops_by_module(model, (1, *input_shape))
        self.weight_flops: dict[str, int] = {}
        for name, module in model.named_modules():
            if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.Linear)) \
                    and name in per_module:
                self.weight_flops[f"{name}.weight"] = per_module[name]
        self.shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        self.total_channels = sum(g.size for g in graph.groups)

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

    def cost(self, plan: ChannelPlan, metric: TargetMetric) -> float:
        """Fraction of ``metric`` the planned model keeps."""
        if metric is TargetMetric.CHANNELS:
            return 1.0 - plan.num_removed() / max(self.total_channels, 1)
        removed = self.removed_per_dim(plan)
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
        return (self.dense_flops - lost) / self.dense_flops


def _kept_fraction(shape: tuple[int, ...], dims: dict[int, float]) -> float:
    frac = 1.0
    for d, r in dims.items():
        frac *= max(0.0, 1.0 - r / shape[d])
    return frac


def plan_for_target(scores: dict[str, torch.Tensor], cost: CostModel, target: Target,
                    config: AllocationConfig = AllocationConfig()) -> tuple[ChannelPlan, float]:
    """The plan removing the lowest-scored channels that meets ``target``, and the fraction it keeps.

    Channels tied together (a grouped convolution's positions) are ranked and removed as one unit scored by the
    sum of its channels. Global allocation ranks units of all groups by their score divided by the group's mean.

    Raises:
        InfeasibleTargetError: even removing ``max_per_layer`` of every group keeps too much.
    """
    units = {root: (cost.graph.by_root[root].units if root in cost.graph.by_root
                    else [(i,) for i in range(len(s))]) for root, s in scores.items()}
    unit_scores = {root: torch.stack([scores[root][list(u)].sum() for u in units[root]]) for root in scores}
    groups = {root: us for root, us in unit_scores.items() if len(us) > 1}
    caps = {root: min(len(us) - 1, int(math.floor(config.max_per_layer * len(us)))) for root, us in groups.items()}
    selector = _UnitSelector(units, {root: torch.argsort(us, stable=True) for root, us in groups.items()},
                             config.round_to)
    if groups and config.round_to > 1 and all(len(us) <= config.round_to for us in groups.values()):
        widest = max(len(us) for us in groups.values())
        raise InfeasibleTargetError(
            f"round_to={config.round_to} is at least the width of every prunable group (the widest has {widest}), "
            f"so no group can keep a smaller multiple of it; pick --round-to below {widest}")

    if config.allocation is Allocation.UNIFORM:
        steps = sorted({k / len(us) for us in groups.values() for k in range(len(us) + 1)})
        candidates = [selector.plan({r: min(caps[r], int((f + 1e-12) * len(groups[r]))) for r in groups})
                      for f in steps if f <= config.max_per_layer + 1e-12]
    else:
        ranked = []
        for root, us in groups.items():
            norm = us / us.mean() if us.mean() > 0 else torch.argsort(torch.argsort(us)).double()
            for rank, unit in enumerate(selector.orders[root].tolist()):
                if rank < caps[root]:
                    ranked.append((float(norm[unit]), root))
        ranked.sort(key=lambda e: e[0])  # stable: a group's units stay in their own order
        candidates = _PrefixPlans(ranked, selector)

    def keep_of(i: int) -> float:
        return cost.cost(candidates[i], target.metric)

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
        plan, kept = _refine(plan, kept, selector, caps, cost, target)
    return plan, kept


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
            target: Target, max_moves: int = 200) -> tuple[ChannelPlan, float]:
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
                value = cost.cost(selector.plan({**removed_units, r: n}), target.metric)
                if abs(value - target.keep) < best_gap - 1e-12:
                    best_move, best_gap, best_value = (r, n), abs(value - target.keep), value
        if best_move is None:
            break
        removed_units[best_move[0]] = best_move[1]
        kept = best_value
        if abs(kept / target.keep - 1) <= 0.005:
            break
    return selector.plan(removed_units), kept
