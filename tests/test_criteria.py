"""Importance criteria against hand computations on a tiny conv-bn-conv network: magnitudes sum over every slice the
channel removes (norm layers excluded), bn is |gamma|, first-order Taylor equals (sum of w * grad)^2 per batch from
autograd, averaged; plus the registry and the shape/finiteness checks of ``score_groups``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunekit.channels.criteria import CRITERIA, BNScale, Criterion, Magnitude, RandomScores, Taylor, score_groups
from prunekit.channels.graph import ChannelGraph


class ConvBNConv(nn.Module):
    """conv1 (3->4, no bias) -> bn -> relu -> conv2 (4->5, no bias) -> relu -> pool -> fc (5->3)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1, bias=False)
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.bn(self.conv1(x)))))
        return self.fc(x.mean((2, 3)))


@pytest.fixture
def net() -> tuple[ConvBNConv, ChannelGraph]:
    torch.manual_seed(0)
    model = ConvBNConv()
    with torch.no_grad():  # non-trivial BN parameters and statistics, signs included
        model.bn.weight.copy_(torch.tensor([0.5, -1.5, 2.0, -0.25]))
        model.bn.bias.copy_(torch.randn(4) * 0.1)
        model.bn.running_mean.copy_(torch.randn(4) * 0.1)
        model.bn.running_var.copy_(torch.rand(4) + 0.5)
    model.eval()
    graph = ChannelGraph(model, torch.randn(2, 3, 6, 6))
    assert set(graph.by_root) == {"conv1", "conv2"}
    return model, graph


def test_group_members_are_the_slices_the_channel_removes(net):
    _, graph = net
    names = {g.root: sorted((s.name, s.dim) for s in g.slices()) for g in graph.groups}
    assert names["conv1"] == [("bn.bias", 0), ("bn.weight", 0), ("conv1.weight", 0), ("conv2.weight", 1)]
    assert names["conv2"] == [("conv2.weight", 0), ("fc.weight", 1)]


def test_l1_is_the_sum_of_absolute_weights_without_norm_layers(net):
    model, graph = net
    w1, w2, fc = model.conv1.weight.detach(), model.conv2.weight.detach(), model.fc.weight.detach()
    expected1 = w1.abs().sum((1, 2, 3)) + w2.abs().sum((0, 2, 3))
    expected2 = w2.abs().sum((1, 2, 3)) + fc.abs().sum(0)
    scores = score_groups(Magnitude(1), graph)
    assert scores["conv1"].dtype == torch.float64
    torch.testing.assert_close(scores["conv1"], expected1.double(), rtol=1e-6, atol=0)
    torch.testing.assert_close(scores["conv2"], expected2.double(), rtol=1e-6, atol=0)


def test_l2_is_the_root_of_the_summed_squares(net):
    model, graph = net
    w1, w2 = model.conv1.weight.detach().double(), model.conv2.weight.detach().double()
    expected = (w1.pow(2).sum((1, 2, 3)) + w2.pow(2).sum((0, 2, 3))).sqrt()
    torch.testing.assert_close(CRITERIA.get("l2")()(graph.by_root["conv1"]), expected, rtol=1e-6, atol=0)


def test_bn_is_the_absolute_scale(net):
    model, graph = net
    scores = BNScale()(graph.by_root["conv1"])
    assert torch.equal(scores, torch.tensor([0.5, 1.5, 2.0, 0.25], dtype=torch.float64))
    assert torch.equal(scores, model.bn.weight.detach().abs().double())


def test_bn_on_a_group_without_batchnorm_is_refused(net):
    _, graph = net
    with pytest.raises(ValueError, match="bn criterion needs a BatchNorm scale.*conv2 has none.*l1/l2/taylor"):
        BNScale()(graph.by_root["conv2"])
    with pytest.raises(ValueError, match="conv2 has none"):
        score_groups(BNScale(), graph)


def _batches(n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(11)
    return [(torch.randn(4, 3, 6, 6, generator=gen), torch.randint(0, 3, (4,), generator=gen)) for _ in range(n)]


def test_taylor_equals_squared_weight_times_gradient_averaged_over_batches(net):
    model, graph = net
    batches = _batches()
    # Hand computation: per batch, per channel c of the conv1 group, (sum over its slices of w * dL/dw)^2.
    params = [model.conv1.weight, model.bn.weight, model.bn.bias, model.conv2.weight, model.fc.weight]
    expected = {"conv1": torch.zeros(4, dtype=torch.float64), "conv2": torch.zeros(5, dtype=torch.float64)}
    model.eval()
    for x, y in batches:
        g1, gw, gb, g2, gfc = torch.autograd.grad(F.cross_entropy(model(x), y), params)
        w1, w, b, w2, wfc = (p.detach().double() for p in params)
        c1 = (w1 * g1).sum((1, 2, 3)) + w * gw + b * gb + (w2 * g2).sum((0, 2, 3))
        c2 = (w2 * g2).sum((1, 2, 3)) + (wfc * gfc).sum(0)
        expected["conv1"] += c1.pow(2)
        expected["conv2"] += c2.pow(2)
    model.train()  # prepare must score in eval mode and put the mode back
    stats = model.bn.running_mean.clone()
    taylor = CRITERIA.get("taylor")()
    assert taylor.needs_data
    taylor.prepare(model, graph, batches)
    assert model.training and torch.equal(model.bn.running_mean, stats)
    assert all(p.grad is None for p in model.parameters())
    scores = score_groups(taylor, graph)
    for root in ("conv1", "conv2"):
        torch.testing.assert_close(scores[root], expected[root] / len(batches), rtol=1e-5, atol=1e-12)
    assert (scores["conv1"] > 0).all()


def test_taylor_needs_data_and_preparation(net):
    model, graph = net
    with pytest.raises(RuntimeError, match="not prepared; call prepare"):
        Taylor()(graph.by_root["conv1"])
    with pytest.raises(ValueError, match="at least one batch"):
        Taylor().prepare(model, graph, [])


def test_random_is_reproducible_per_seed(net):
    _, graph = net

    def run(seed):
        return score_groups(RandomScores(seed), graph)

    a, b, c = run(3), run(3), run(4)
    for root in a:
        assert torch.equal(a[root], b[root])
        assert ((a[root] >= 0) & (a[root] < 1)).all()
    assert any(not torch.equal(a[root], c[root]) for root in a)
    assert torch.equal(CRITERIA.get("random")()(graph.by_root["conv1"]), RandomScores(0)(graph.by_root["conv1"]))


def test_registry_lists_the_structural_and_curvature_criteria():
    import prunekit.curvature.obs  # noqa: F401  (registers the curvature criteria)

    names = ["bn", "c-obd", "c-obs", "kron-obd", "kron-obs", "l1", "l2", "random", "taylor"]
    assert CRITERIA.list() == names
    assert [CRITERIA.get(n)().name for n in CRITERIA.list()] == names
    with pytest.raises(ValueError, match="unknown criterion 'l3'.*known criterions: bn, c-obd"):
        CRITERIA.get("l3")


def test_magnitude_norm_is_validated():
    with pytest.raises(ValueError, match="p must be 1 or 2, got 3"):
        Magnitude(3)


class _Fake(Criterion):
    name = "fake"

    def __init__(self, make) -> None:
        self.make = make

    def __call__(self, group):
        return self.make(group.size)


@pytest.mark.parametrize("make,match", [
    (lambda n: torch.zeros(n + 1), r"criterion fake returned shape \(5,\) for conv1, expected \(4,\)"),
    (lambda n: torch.zeros(n, 1), r"returned shape \(4, 1\) for conv1, expected \(4,\)"),
    (lambda n: torch.full((n,), float("nan")), "criterion fake gave non-finite scores for conv1"),
    (lambda n: torch.tensor([1.0] * (n - 1) + [float("inf")]), "non-finite scores"),
], ids=["long", "2d", "nan", "inf"])
def test_score_groups_rejects_bad_scores(net, make, match):
    model, _ = net
    graph = ChannelGraph(model, torch.randn(2, 3, 6, 6), ignore=["conv2"])  # conv1 is the only group
    with pytest.raises(ValueError, match=match):
        score_groups(_Fake(make), graph)


def test_score_groups_returns_float64_cpu(net):
    _, graph = net
    scores = score_groups(_Fake(lambda n: torch.arange(n, dtype=torch.float32)), graph)
    assert all(s.dtype == torch.float64 and s.device.type == "cpu" for s in scores.values())
    assert torch.equal(scores["conv1"], torch.arange(4, dtype=torch.float64))
