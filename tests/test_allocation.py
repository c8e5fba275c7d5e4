"""Allocation: targets and configs validate and round-trip; the cost model predicts the shrunk model's parameters and
FLOPs exactly; plan_for_target reaches its target (measured after shrinking) under uniform and global allocation,
respects the per-layer cap, and explains infeasible targets."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from architectures import ARCHITECTURES, calibrate_bn_
from prunekit.channels.criteria import CRITERIA, Magnitude, score_groups
from prunekit.channels.graph import ChannelGraph, ChannelPlan
from prunekit.measurement.metrics import count_flops, count_params
from prunekit.models import create_model
from prunekit.planning.allocation import (
    Allocation,
    AllocationConfig,
    CostModel,
    InfeasibleTargetError,
    Target,
    TargetMetric,
    plan_for_target,
)

CIFAR = (3, 32, 32)



# ---------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("text,metric,keep", [
    ("flops=0.25", TargetMetric.FLOPS, 0.25),
    ("params=x4", TargetMetric.PARAMS, 0.25),
    ("channels=0.7", TargetMetric.CHANNELS, 0.7),
    (" FLOPS = 0.5 ", TargetMetric.FLOPS, 0.5),
    ("flops=x2.5", TargetMetric.FLOPS, 0.4),
])
def test_target_parse(text, metric, keep):
    target = Target.parse(text)
    assert target.metric is metric and target.keep == pytest.approx(keep, rel=1e-12)
    assert Target.parse(str(target)) == target
    assert Target(**target.to_dict()) == target


@pytest.mark.parametrize("text,match", [
    ("flops", r"target must look like METRIC=FRACTION .*got 'flops'"),
    ("0.25", r"METRIC=FRACTION"),
    ("flops=abc", r"target value must be a fraction like 0.25 or a factor like x4, got 'abc'"),
    ("flops=x0", r"got 'x0'"),
    ("flops=", r"got ''"),
    ("speed=0.5", r"target metric must be one of \['flops', 'params', 'channels', 'latency'\], got 'speed'"),
    ("flops=1.5", r"keep fraction must be in \(0, 1\), got 1.5 \(e.g. flops=0.25"),
    ("flops=x1", r"keep fraction must be in \(0, 1\), got 1.0"),
    ("params=0", r"keep fraction must be in \(0, 1\), got 0.0"),
    ("params=-0.5", r"got -0.5"),
    ("params=nan", r"got nan"),
])
def test_target_parse_rejects_bad_strings(text, match):
    with pytest.raises(ValueError, match=match):
        Target.parse(text)


@pytest.mark.parametrize("keep", [0, 1, 1.0, -0.1, 2, "0.5", None, True])
def test_target_keep_outside_open_unit_interval(keep):
    with pytest.raises(ValueError, match="keep fraction must be in"):
        Target("flops", keep)


def test_allocation_config_validation_and_round_trip():
    config = AllocationConfig("uniform", max_per_layer=0.5, tolerance=0.01)
    assert config.allocation is Allocation.UNIFORM
    assert AllocationConfig(**config.to_dict()) == config
    assert AllocationConfig().allocation is Allocation.GLOBAL
    with pytest.raises(ValueError, match=r"allocation must be one of \['uniform', 'global'\], got 'greedy'"):
        AllocationConfig("greedy")
    for cap in (0, 1, 1.5, -0.2):
        with pytest.raises(ValueError, match=rf"max_per_layer must be in \(0, 1\), got {cap}"):
            AllocationConfig(max_per_layer=cap)
    for tol in (0, 0.5, -1):
        with pytest.raises(ValueError, match=rf"tolerance must be in \(0, 0.5\), got {tol}"):
            AllocationConfig(tolerance=tol)


# ---------------------------------------------------------------------------------------------- cost model


def _resnet_or_vgg(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = create_model(name)
    calibrate_bn_(model, CIFAR)
    return model, torch.randn(2, *CIFAR, generator=torch.Generator().manual_seed(1))


def _random_plan(graph: ChannelGraph, seed: int) -> ChannelPlan:
    """A different random fraction (0 to 80%) of every group."""
    gen = torch.Generator().manual_seed(seed)
    removed = {}
    for g in graph.groups:  # whole units: a grouped convolution's tied channels go together
        n = len(g.units)
        k = int(torch.randint(0, int(0.8 * n) + 1, (1,), generator=gen))
        removed[g.root] = [c for u in torch.randperm(n, generator=gen)[: min(k, n - 1)].tolist() for c in g.units[u]]
    return ChannelPlan(removed)


def _check_prediction(model: nn.Module, x: torch.Tensor, shape: tuple[int, ...], plan_seed: int,
                      metrics: tuple[TargetMetric, ...] = (TargetMetric.PARAMS, TargetMetric.FLOPS)) -> None:
    graph = ChannelGraph(model, x)
    cost = CostModel(model, graph, shape)
    assert cost.dense_params == count_params(model)
    assert cost.dense_flops == count_flops(model, (1, *shape))
    plan = _random_plan(graph, plan_seed)
    assert plan
    predicted = {m: cost.cost(plan, m) for m in metrics}
    channels = cost.cost(plan, TargetMetric.CHANNELS)
    graph.shrink_(plan)
    measured = {TargetMetric.PARAMS: count_params(model), TargetMetric.FLOPS: count_flops(model, (1, *shape))}
    dense = {TargetMetric.PARAMS: cost.dense_params, TargetMetric.FLOPS: cost.dense_flops}
    for m in metrics:
        assert predicted[m] * dense[m] == pytest.approx(measured[m], rel=1e-9, abs=1e-6), m.value
        assert round(predicted[m] * dense[m]) == measured[m], m.value
    assert channels == pytest.approx(1 - plan.num_removed() / sum(g.size for g in graph.groups))


@pytest.mark.parametrize("name", ["resnet20", "vgg11"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cost_model_predicts_the_shrunk_model_exactly(name, seed):
    model, x = _resnet_or_vgg(name)
    _check_prediction(model, x, CIFAR, seed)


_COST_CASES = [
    pytest.param(name, metric, id=f"{name}-{metric.value}")
    for name in ARCHITECTURES for metric in (TargetMetric.PARAMS, TargetMetric.FLOPS)
]


@pytest.mark.parametrize("name,metric", _COST_CASES)
def test_cost_model_is_exact_on_every_architecture(name, metric):
    arch = ARCHITECTURES[name]
    torch.manual_seed(0)
    model = arch.factory()
    calibrate_bn_(model, arch.input_shape)
    x = torch.randn(2, *arch.input_shape, generator=torch.Generator().manual_seed(1))
    _check_prediction(model, x, arch.input_shape, plan_seed=5, metrics=(metric,))


# ---------------------------------------------------------------------------------------------- allocation


@pytest.fixture(scope="module")
def resnet20_base() -> tuple[nn.Module, torch.Tensor]:
    return _resnet_or_vgg("resnet20")


def _plan(base, target: Target, config: AllocationConfig):
    model, x = copy.deepcopy(base[0]), base[1]
    graph = ChannelGraph(model, x)
    cost = CostModel(model, graph, CIFAR)
    scores = score_groups(Magnitude(1), graph)
    plan, kept = plan_for_target(scores, cost, target, config)
    return model, graph, cost, scores, plan, kept


@pytest.mark.parametrize("allocation", ["uniform", "global"])
@pytest.mark.parametrize("text", ["flops=0.25", "params=0.5"])
def test_plan_reaches_the_target_after_shrinking(resnet20_base, allocation, text):
    target = Target.parse(text)
    model, graph, cost, scores, plan, kept = _plan(resnet20_base, target, AllocationConfig(allocation))
    graph.shrink_(plan)
    measured = (count_flops(model, (1, *CIFAR)) / cost.dense_flops if target.metric is TargetMetric.FLOPS
                else count_params(model) / cost.dense_params)
    assert abs(measured - target.keep) / target.keep <= 0.02
    assert kept == pytest.approx(measured, rel=1e-9)
    # within each group the removed channels are the lowest scored
    for root, idxs in plan.removed.items():
        s = scores[root]
        kept_idx = [i for i in range(len(s)) if i not in idxs]
        assert s[list(idxs)].max() <= s[kept_idx].min()


def test_uniform_removes_the_same_fraction_of_every_group(resnet20_base):
    _, graph, _, _, plan, _ = _plan(resnet20_base, Target.parse("flops=0.4"), AllocationConfig("uniform"))
    sizes = {g.root: g.size for g in graph.groups}
    assert set(plan.removed) == set(sizes)  # every group (all have >1 channel) loses some
    # counts are floor(f * n) for one common f: the intervals [r/n, (r+1)/n) share a point
    lo = max(len(plan.removed[r]) / n for r, n in sizes.items())
    hi = min((len(plan.removed[r]) + 1) / n for r, n in sizes.items())
    assert lo < hi, {r: (len(plan.removed[r]), n) for r, n in sizes.items()}


def test_global_allocation_ranks_per_layer_normalised_scores(resnet20_base):
    _, graph, cost, scores, _, _ = _plan(resnet20_base, Target.parse("channels=0.5"), AllocationConfig())
    config, target = AllocationConfig(max_per_layer=0.75), Target.parse("channels=0.8")
    plan, _ = plan_for_target(scores, cost, target, config)
    # scores are normalised by their layer mean, so scaling one layer's scores changes nothing ...
    scaled = {r: (s * 1e-3 if r == "layer2.1.conv1" else s) for r, s in scores.items()}
    assert plan_for_target(scaled, cost, target, config)[0] == plan
    # ... but a layer whose channels are negligible next to its mean goes first, up to the cap
    low = "layer2.1.conv1"
    skewed = dict(scores)
    skewed[low] = torch.full((32,), 1e-6, dtype=torch.float64)
    skewed[low][7] = 1.0
    plan, _ = plan_for_target(skewed, cost, target, config)
    assert len(plan.removed[low]) == math.floor(0.75 * 32) and 7 not in plan.removed[low]
    assert max(len(v) / graph.by_root[r].size for r, v in plan.removed.items() if r != low) < 0.75


@pytest.mark.parametrize("allocation", ["uniform", "global"])
@pytest.mark.parametrize("cap", [0.3, 0.99])
def test_per_layer_cap_is_respected(resnet20_base, allocation, cap):
    # targets just inside what the cap allows, so that it binds (0.99 leaves one channel of every group)
    target = Target.parse("flops=0.55" if cap == 0.3 else "channels=0.03")
    model, graph, _, _, plan, _ = _plan(resnet20_base, target, AllocationConfig(allocation, max_per_layer=cap))
    counts = {r: len(plan.removed.get(r, ())) for r in graph.by_root}
    limits = {r: math.floor(cap * graph.by_root[r].size) for r in graph.by_root}
    assert all(counts[r] <= limits[r] for r in counts), (counts, limits)
    assert all(counts[r] <= graph.by_root[r].size - 1 for r in counts)
    assert any(counts[r] == limits[r] for r in counts), "the cap should bind for this target"
    graph.shrink_(plan)  # at least one channel stays everywhere, so the plan is valid
    assert all(m.out_channels >= 1 for m in model.modules() if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_infeasible_target_names_the_cap(resnet20_base, allocation):
    with pytest.raises(InfeasibleTargetError, match=r"target flops=0.001 is infeasible with max_per_layer=0.5.*"
                                                    r"still keeps 0\.\d+ of the flops"):
        _plan(resnet20_base, Target.parse("flops=0.001"), AllocationConfig(allocation, max_per_layer=0.5))
    assert issubclass(InfeasibleTargetError, ValueError)


@pytest.mark.parametrize("allocation", ["global", "uniform"])
def test_round_to_keeps_multiples_and_still_meets_the_target(allocation):
    model, x = _resnet_or_vgg("resnet20")
    graph = ChannelGraph(model, x)
    cost = CostModel(model, graph, CIFAR)
    scores = score_groups(CRITERIA.get("l1")(), graph)
    config = AllocationConfig(allocation, round_to=8)
    plan, kept = plan_for_target(scores, cost, Target.parse("flops=0.5"), config)
    for root, idxs in plan.removed.items():
        assert (graph.by_root[root].size - len(idxs)) % 8 == 0, root
    assert abs(kept / 0.5 - 1) <= 0.02
    with pytest.raises(ValueError, match="round_to must be a positive int"):
        AllocationConfig(round_to=0)
