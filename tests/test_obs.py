"""C-OBD, C-OBS, Kron-OBD and Kron-OBS against brute-force minimisation of the quadratic model on tiny layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import prunekit
from prunekit.channels.graph import ChannelGraph, ChannelPlan
from prunekit.curvature.kfac import CurvatureConfig, FisherType
from prunekit.curvature.obs import COBD, COBS, KronOBD, KronOBS


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def _data(n: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)) for _ in range(2)]


def _prepared(criterion_cls, **cfg):
    model = _mlp()
    graph = ChannelGraph(model, torch.randn(2, 4))
    crit = criterion_cls(CurvatureConfig(fisher=FisherType.EMPIRICAL, batches=2, damping=0.05, **cfg))
    crit.prepare(model, graph, _data())
    return model, graph, crit


def _matrix(layer: nn.Linear) -> torch.Tensor:
    return torch.cat([layer.weight.detach(), layer.bias.detach()[:, None]], 1).double()


def _brute_force(H: torch.Tensor, w: torch.Tensor, removed: torch.Tensor) -> tuple[torch.Tensor, float]:
    """min_d 1/2 vec(d)^T H vec(d) s.t. the removed entries of w + d are zero; returns (d, minimum)."""
    v = w.reshape(-1)
    fixed = removed.reshape(-1)
    d = torch.zeros_like(v)
    d[fixed] = -v[fixed]
    free = ~fixed
    d[free] = torch.linalg.solve(H[free][:, free], -H[free][:, fixed] @ d[fixed])
    return d.reshape(w.shape), 0.5 * float(d @ H @ d)


@pytest.mark.parametrize("update", ["joint", "individual"])
def test_kron_obs_saliency_and_update_equal_the_brute_force_minimum(update):
    model, graph, crit = _prepared(KronOBS, obs_update=update)
    (group,) = graph.groups
    removed = [1, 3] if update == "joint" else [2]
    w0, w2 = _matrix(model[0]), _matrix(model[2])
    A0, G0 = crit.factors["0"].damped(0.05)
    A2, G2 = crit.factors["2"].damped(0.05)
    mask0 = torch.zeros_like(w0, dtype=torch.bool)
    mask0[removed] = True
    mask2 = torch.zeros_like(w2, dtype=torch.bool)
    mask2[:, removed] = True
    d0, cost0 = _brute_force(torch.kron(G0, A0), w0, mask0)
    d2, cost2 = _brute_force(torch.kron(G2, A2), w2, mask2)
    if len(removed) == 1:  # one channel: the saliency is the exact loss increase of its removal
        assert crit(group)[removed[0]].item() == pytest.approx(cost0 + cost2, rel=1e-6)
    crit.update_weights_(graph, ChannelPlan({"0": tuple(removed)}))
    torch.testing.assert_close(_matrix(model[0]), (w0 + d0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(_matrix(model[2]), (w2 + d2), rtol=1e-4, atol=1e-5)


def test_individual_update_sums_single_channel_corrections():
    model, graph, crit = _prepared(KronOBS, obs_update="individual")
    w0 = _matrix(model[0])
    A0, G0 = crit.factors["0"].damped(0.05)
    total = torch.zeros_like(w0)
    for c in (0, 4):
        mask = torch.zeros_like(w0, dtype=torch.bool)
        mask[c] = True
        total += _brute_force(torch.kron(G0, A0), w0, mask)[0]
    crit.update_weights_(graph, ChannelPlan({"0": (0, 4)}))
    torch.testing.assert_close(_matrix(model[0]), w0 + total, rtol=1e-4, atol=1e-5)


def test_kron_obd_is_the_quadratic_model_of_zeroing_the_channel_without_correction():
    model, graph, crit = _prepared(KronOBD)
    (group,) = graph.groups
    f0, f2 = crit.factors["0"], crit.factors["2"]
    w0, w2 = _matrix(model[0]), _matrix(model[2])
    for c in range(5):
        d0 = torch.zeros_like(w0)
        d0[c] = -w0[c]
        d2 = torch.zeros_like(w2)
        d2[:, c] = -w2[:, c]
        expected = 0.5 * (d0.reshape(-1) @ torch.kron(f0.G, f0.A) @ d0.reshape(-1)) \
            + 0.5 * (d2.reshape(-1) @ torch.kron(f2.G, f2.A) @ d2.reshape(-1))
        # Kron-OBD keeps only the channel's own rows of G (rows) or block of A (columns): the same quadratic form
        assert crit(group)[c].item() == pytest.approx(float(expected), rel=1e-6)
    w_before = _matrix(model[0])
    crit.update_weights_(graph, ChannelPlan({"0": (1,)}))
    torch.testing.assert_close(_matrix(model[0]), w_before)  # OBD never changes the weights


def test_c_obs_single_weight_saliency_is_the_brute_force_minimum_for_that_weight():
    model, graph, crit = _prepared(COBS)
    A0, G0 = crit.factors["0"].damped(0.05)
    w0 = _matrix(model[0])
    H = torch.kron(G0, A0)
    for i, j in [(0, 0), (2, 3), (4, 4)]:
        mask = torch.zeros_like(w0, dtype=torch.bool)
        mask[i, j] = True
        _, cost = _brute_force(H, w0, mask)
        single = 0.5 * w0[i, j] ** 2 / (torch.linalg.inv(G0)[i, i] * torch.linalg.inv(A0)[j, j])
        assert float(single) == pytest.approx(cost, rel=1e-6)
    (group,) = graph.groups
    d = torch.outer(torch.linalg.inv(G0).diagonal(), torch.linalg.inv(A0).diagonal())
    row_part = 0.5 * float((w0[1] ** 2 / d[1]).sum())
    assert crit(group)[1].item() > row_part  # the column part of the next layer adds to it


def test_c_obd_sums_the_diagonal_fisher_saliency_over_rows_and_columns():
    model, graph, crit = _prepared(COBD)
    (group,) = graph.groups
    w0, w2 = _matrix(model[0]), _matrix(model[2])
    expected = 0.5 * ((w0 ** 2 * crit.diagonal["0"]).sum(1) + (w2[:, :5] ** 2 * crit.diagonal["2"][:, :5]).sum(0))
    torch.testing.assert_close(crit(group), expected)


def test_conv_columns_cover_every_kernel_offset_of_an_input_channel():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3), nn.Flatten(),
                          nn.Linear(3 * 4 * 4, 2))
    graph = ChannelGraph(model, torch.randn(2, 2, 6, 6))
    crit = KronOBD(CurvatureConfig(fisher=FisherType.EMPIRICAL, batches=1))
    g = torch.Generator().manual_seed(0)
    crit.prepare(model, graph, [(torch.randn(8, 2, 6, 6, generator=g), torch.randint(0, 2, (8,), generator=g))])
    group = next(gr for gr in graph.groups if gr.root == "0")
    f2, w2 = crit.factors["2"], crit.weight("2")
    cols = torch.arange(9, 18)  # input channel 1 of the second conv: 9 kernel offsets
    col_part = 0.5 * float((f2.A[cols][:, cols] * (w2[:, cols].T @ f2.G @ w2[:, cols])).sum())
    f0, w0 = crit.factors["0"], crit.weight("0")
    row_part = 0.5 * float(f0.G[1, 1] * (w0[1] @ f0.A @ w0[1]))
    assert crit(group)[1].item() == pytest.approx(row_part + col_part, rel=1e-9)


@pytest.mark.parametrize("method", ["c-obd", "c-obs", "kron-obd", "kron-obs"])
def test_curvature_methods_prune_a_resnet_to_the_target(method, synthetic):
    from prunekit.measurement.metrics import count_flops
    from prunekit.models import ModelConfig, create_model

    torch.manual_seed(0)
    model = create_model(ModelConfig("resnet20", in_channels=1, num_classes=4, input_size=12, width=0.25))
    dense = count_flops(model, (1, 1, 12, 12))
    config = prunekit.get_method(method).config(target="flops=0.5", curvature=prunekit.FisherSettings(fisher_batches=2))
    prunekit.prune_(model, config, synthetic, prunekit.RunContext(progress=False, log=lambda s: None))
    assert count_flops(model, (1, 1, 12, 12)) / dense == pytest.approx(0.5, abs=0.02)


def test_group_without_curvature_statistics_is_a_clear_error():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 5 * 5, 2))
    graph = ChannelGraph(model, torch.randn(2, 4, 5, 5))
    crit = KronOBS(CurvatureConfig(batches=1))
    crit.prepare(model, graph, [(torch.randn(4, 4, 5, 5), torch.zeros(4, dtype=torch.long))])
    group = next(g for g in graph.groups if g.root == "0")
    # the group still has the Linear's columns, so it is scored; a group made only of the grouped conv is not
    assert crit(group).shape == (group.size,)
    crit.layers.pop("4")
    with pytest.raises(ValueError, match="no Linear/Conv2d layer with curvature statistics"):
        crit(group)
