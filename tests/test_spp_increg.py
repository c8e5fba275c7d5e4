"""SPP (sampled masks from rank-driven probabilities), IncReg (rank-driven growing penalties) and sDprun
(group-thresholded dual averaging): the update rules against their formulas, the invariants of each method's state,
and the methods end to end through the registry, the saved record and the CLI."""

from __future__ import annotations

import math

import pytest
import torch

import prunekit
from prunekit.channels.graph import ChannelGraph
from prunekit.cli import main
from prunekit.methods.group_training import GroupUnits, rank_increment
from prunekit.methods.increg import IncRegHooks
from prunekit.methods.sdprun import GRDAHooks
from prunekit.methods.spp import SPPHooks, UnitDraw


def _lenet():
    torch.manual_seed(0)
    return prunekit.create_model("lenet5", num_classes=4, in_channels=1, input_size=12)


def _units(model, remove=3):
    graph = ChannelGraph(model, torch.randn(2, 1, 12, 12))
    return GroupUnits(model, graph, {g.root: remove for g in graph.groups})


def test_the_increments_follow_their_formulas():
    ranks = torch.arange(10)
    linear = rank_increment(ranks, 4, 0.2, "linear")
    assert linear[:4].tolist() == pytest.approx([0.2, 0.15, 0.1, 0.05])  # A (1 - r/m)
    assert linear[4:].tolist() == pytest.approx([-0.2 * (r - 4) / 6 for r in range(4, 10)])
    def spp(*ranks):  # the exponential shape does not depend on N; 12 units so that m = 4 fits
        padded = torch.tensor([*ranks, *[0.0] * 12], dtype=torch.float64)
        return rank_increment(padded, 4, 0.2, "exponential", u=0.25)[:len(ranks)]

    expo = spp(*torch.linspace(0, 8, 801).tolist())
    a = math.log(2 / 0.25) / 4
    centre = -math.log(0.25) / a
    assert float(expo[0]) == pytest.approx(0.2) and float(spp(4.0)[0]) == pytest.approx(0.0, abs=1e-12)  # 0 at m
    assert float(spp(centre)[0]) == pytest.approx(0.25 * 0.2)
    steps = expo[1:] - expo[:-1]
    assert float(steps.max()) <= 0 and float(steps.abs().max()) < 0.01  # decreasing and continuous
    for x in (0.5, 1.0, 1.5):  # point-symmetric about (N_c, uA)
        left, right = spp(centre - x, centre + x)
        assert float(left + right) == pytest.approx(2 * 0.25 * 0.2)
    with pytest.raises(ValueError, match="unknown increment shape"):
        rank_increment(ranks, 4, 0.2, "cubic")
    with pytest.raises(ValueError, match="remove must be in"):
        rank_increment(ranks, 10, 0.2, "linear")


def test_the_increg_penalty_is_half_the_factor_weighted_squared_norm_of_each_unit():
    model = _lenet()
    units = _units(model)
    hooks = IncRegHooks(units, amplitude=0.3, ceiling=1.0, interval=1)
    hooks.factors = {root: torch.rand(g.units, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
                     for root, g in units.groups.items()}
    conv = model.conv1  # a group with one producer: each unit is a filter and its bias
    by_hand = sum(0.5 * float(hooks.factors[root] @ _filter_norms(getattr(model, root)))
                  for root in units.groups if root.startswith("conv"))
    for root in units.groups:  # only the conv groups weigh: the penalty is then the hand count alone
        if not root.startswith("conv"):
            hooks.factors[root].zero_()
    assert conv.weight.shape[0] == units.groups["conv1"].units
    penalty = hooks.penalty(model)
    assert float(penalty.detach()) == pytest.approx(by_hand, rel=1e-5)
    penalty.backward()  # d/dw of lambda/2 ||w||^2 is lambda w
    factor = hooks.factors["conv1"].float()[:, None, None, None]
    assert torch.allclose(conv.weight.grad, factor * conv.weight.detach(), atol=1e-6)


def _filter_norms(layer):
    w = layer.weight.detach().double()
    return w.pow(2).flatten(1).sum(1) + (layer.bias.detach().double() ** 2 if layer.bias is not None else 0)


def test_increg_factors_stay_in_range_and_never_fall_for_the_units_being_removed():
    model = _lenet()
    units = _units(model)
    hooks = IncRegHooks(units, amplitude=0.3, ceiling=1.0, interval=1)
    for _ in range(12):  # the weights do not move, so rank m-1 gains A/m per update and reaches 1 by the 10th
        before = {k: v.clone() for k, v in hooks.factors.items()}
        ranks = units.ranks()
        hooks.update()
        for root, f in hooks.factors.items():
            assert bool(((f >= 0) & (f <= 1.0)).all())
            low = ranks[root] < units.groups[root].remove
            assert bool((f[low] >= before[root][low]).all())
    chosen = hooks.choose()
    assert {root: len(u) for root, u in chosen.items()} == {root: 3 for root in units.groups}
    assert all(bool((hooks.factors[root][u] == 1.0).all()) for root, u in chosen.items())


def test_spp_masks_are_drawn_with_their_probabilities():
    units = _units(_lenet())
    draw = UnitDraw(units, "conv1", torch.Generator().manual_seed(0))
    p = torch.zeros(draw.group.units)
    p[:6] = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0, 0.1])
    draw.probability = p.double()
    dropped = torch.zeros(len(p))
    for _ in range(4000):
        draw.resample()
        dropped += 1 - draw.unit_mask().float()
    assert (dropped / 4000).tolist() == pytest.approx(p.tolist(), abs=0.03)
    assert dropped[0] == 0 and dropped[4] == 4000
    draw.training = False
    assert draw.unit_mask()[:6].tolist() == [1, 1, 1, 1, 0, 1]  # evaluation: out only at probability 1
    assert draw.channel_mask().shape == (draw.group.group.size,)
    draws = {root: UnitDraw(units, root, draw.generator) for root in units.groups} | {"conv1": draw}
    hooks = SPPHooks(units, draws, amplitude=1.0, interval=1, generator=draw.generator)
    top = int(units.ranks()["conv1"].argmax())  # the most important unit: its increment is negative
    draw.probability[top] = 1.0
    hooks.update()
    assert draw.probability[top] == 1.0  # a unit at 1 stays out, whatever its rank


def test_a_grda_step_is_the_group_soft_threshold_of_the_accumulated_gradients():
    model = _lenet()
    units = _units(model)
    train = prunekit.TrainConfig(epochs=1, lr=0.1, warmup=0.0, schedule="step")
    hooks = GRDAHooks(units, {root: 0.5 for root in units.groups}, 0.6, train, steps_per_epoch=10, epochs=1)
    w0, b0 = model.conv1.weight.detach().clone(), model.conv1.bias.detach().clone()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    hooks.steps = 1  # as at the second step: w_2 = S_{g(1)}(a_2), with a_2 = w_0 - gamma * grad here
    hooks.after_step(model, None, 0)
    a_w, a_b = w0 - train.lr_at(0.0), b0 - train.lr_at(0.0)  # a_1 = w_0 - gamma * grad
    g = 0.5 * math.sqrt(0.1) * (1 * 0.1) ** 0.6  # c sqrt(gamma) (n gamma)^mu
    norms = (a_w.flatten(1).pow(2).sum(1) + a_b.pow(2)).sqrt()
    factor = (1 - g * math.sqrt(a_w[0].numel() + 1) / norms).clamp_min(0)
    assert torch.allclose(model.conv1.weight, a_w * factor[:, None, None, None], atol=1e-6)
    assert torch.allclose(model.conv1.bias, a_b * factor, atol=1e-6)
    hooks.c = {root: 1e6 for root in units.groups}  # a huge threshold zeroes every unit's conv/linear weights
    hooks.after_step(model, None, 1)
    assert float(model.conv1.weight.detach().abs().sum()) == 0 and hooks.choose()[1] == units.total()


@pytest.mark.parametrize("method", ["spp", "increg", "sdprun"])
def test_the_methods_meet_the_target_and_their_models_reload(method, tmp_path):
    data = prunekit.load_dataset("synthetic")
    model = _lenet()
    dense = prunekit.count_flops(model, (1, 1, 12, 12))
    extra = {} if method == "sdprun" else {"interval": 2}
    config = prunekit.get_method(method).config(target="flops=0.5", epochs=1, finetune_epochs=1, **extra)
    ctx = prunekit.RunContext(progress=False, log=lambda *_: None, seed=3,
                              train=prunekit.TrainConfig(epochs=0, lr=0.02, augment="none"))
    record = prunekit.prune_(model, config, data, ctx)
    assert prunekit.count_flops(model, (1, 1, 12, 12)) / dense == pytest.approx(0.5, abs=0.03)
    assert record.changes and record.changes[0]["kind"] == "channels"
    assert record.results["train_loss_before"] > 0 and record.results["train_loss_after"] > 0
    assert len(record.rounds) == 1 and 0 <= record.test_acc_before_finetune <= 1
    path = prunekit.save_compressed(tmp_path / "m.safetensors", model, {"name": "lenet5", "num_classes": 4,
                                                                        "in_channels": 1, "input_size": 12},
                                    record.changes)
    loaded, _ = prunekit.load_compressed(path)
    x = data.test.tensors[0][:8]
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


@pytest.mark.parametrize("method, values, message", [
    ("spp", {"epochs": 0}, "epochs must be an int >= 1"),
    ("spp", {"amplitude": 2.0}, "amplitude is a probability step"),
    ("increg", {"interval": 0}, "interval must be an int >= 1"),
    ("increg", {"amplitude": -1.0}, "amplitude must be a number > 0"),
    ("increg", {"ceiling": 0}, "ceiling must be a number in"),
    ("sdprun", {"mu": 1.5}, "mu must be in"),
    ("sdprun", {"c": -1.0}, "c must be a number > 0"),
])
def test_bad_settings_are_refused(method, values, message):
    with pytest.raises(ValueError, match=message):
        prunekit.get_method(method).config(**values)


def test_the_cli_runs_spp_and_writes_its_training_loss(tmp_path, capsys):
    import json

    out = tmp_path / "job"
    assert main(["prune", "spp", "--model", "lenet5", "--data", "synthetic", "--target", "flops=0.6", "--epochs", "1",
                 "--no-latency", "--no-progress", "--out", str(out)]) == 0
    run = json.loads((out / "report.json").read_text())["runs"]["flops-0.6"]
    assert run["results"]["train_loss_before"] > 0 and "reached_one" in run["results"]
    assert (out / "flops-0.6" / "model.safetensors").is_file()
