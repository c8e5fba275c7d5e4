"""DPP masks: exactly k of n for every draw, gradients reach the logits, deterministic evaluation, metric extremes."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

from prunekit.methods.dpp import (
    DPPConfig,
    KOfNMask,
    group_layout,
    gumbel_topk_mask,
    mask_confidence,
    mask_diversity,
    topk_mask,
)
from prunekit.planning.schedule import TemperatureSchedule


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 12), data=st.data(), groups=st.integers(1, 5), temperature=st.floats(0.01, 5.0),
       seed=st.integers(0, 10_000))
def test_every_draw_keeps_exactly_k_of_n(n, data, groups, temperature, seed):
    k = data.draw(st.integers(1, n - 1))
    logits = torch.randn(groups, n, generator=torch.Generator().manual_seed(seed))
    mask = gumbel_topk_mask(logits, k, temperature, generator=torch.Generator().manual_seed(seed + 1))
    assert torch.equal(mask.detach().sum(-1), torch.full((groups,), float(k)))
    assert set(mask.detach().unique().tolist()) <= {0.0, 1.0}


def test_gradients_reach_the_logits_through_the_relaxation():
    logits = torch.zeros(3, 6, requires_grad=True)
    weights = torch.arange(6.0).repeat(3, 1)
    (gumbel_topk_mask(logits, 2, 0.5, generator=torch.Generator().manual_seed(0)) * weights).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("pattern, shape, k, n", [
    ("k-of-n", (4, 8), 2, 4), ("kernel", (4, 6, 3, 3), 2, None), ("filter", (8, 3, 3, 3), 5, None)])
def test_parametrized_layer_is_k_of_n_in_training_and_deterministic_in_eval(pattern, shape, k, n):
    torch.manual_seed(0)
    layer = nn.Linear(shape[1], shape[0]) if len(shape) == 2 else nn.Conv2d(shape[1], shape[0], shape[2])
    config = DPPConfig(pattern=pattern, k=k, n=n)
    parametrize.register_parametrization(layer, "weight", KOfNMask(layer.weight, config))
    mask_module = layer.parametrizations.weight[0]
    layer.train()
    for _ in range(3):
        m = mask_module.mask().detach()
        if pattern == "k-of-n":
            assert (m.reshape(-1, n).sum(1) == k).all()
        elif pattern == "kernel":
            assert (m[:, :, 0, 0].sum(1) == k).all()
        else:
            assert m.reshape(shape[0], -1)[:, 0].sum() == k
    layer.eval()
    assert torch.equal(mask_module.mask(), mask_module.mask())  # deterministic top-k of the logits
    assert torch.equal(mask_module.mask(), mask_module._expand(topk_mask(mask_module.logits.detach(), k)))
    x = torch.randn(2, *((shape[1],) if len(shape) == 2 else (shape[1], 5, 5)))
    layer.train()
    layer.zero_grad()
    layer(x).sum().backward()
    assert mask_module.logits.grad.abs().sum() > 0  # weights and logits train jointly


def test_metrics_are_zero_and_one_at_their_extremes():
    uniform = torch.zeros(5, 4)
    assert mask_confidence(uniform) == pytest.approx(0.0, abs=1e-12)
    assert mask_diversity(uniform) == pytest.approx(0.0, abs=1e-12)
    one_hot = torch.full((4, 4), -1e4)
    one_hot[torch.arange(4), torch.arange(4)] = 1e4  # certain groups, each choosing a different position
    assert mask_confidence(one_hot) == pytest.approx(1.0, abs=1e-9)
    assert mask_diversity(one_hot) == pytest.approx(1.0, abs=1e-9)
    same = torch.full((4, 4), -1e4)
    same[:, 0] = 1e4  # certain and identical: confident, not diverse
    assert mask_confidence(same) == pytest.approx(1.0) and mask_diversity(same) == pytest.approx(0.0, abs=1e-9)


def test_temperature_schedule_is_indexed_by_epoch_and_clamped():
    lin = TemperatureSchedule(start=1.0, end=0.1, mode="linear", floor=0.2)
    assert [round(lin.at(e, 4), 6) for e in range(5)] == [1.0, 0.7, 0.4, 0.2, 0.2]
    exp = TemperatureSchedule(start=1.0, end=0.01, mode="exponential", floor=0.001)
    assert exp.at(0, 3) == pytest.approx(1.0) and exp.at(1, 3) == pytest.approx(0.1) and \
        exp.at(2, 3) == pytest.approx(0.01)
    config = DPPConfig(epochs=4, temperature=lin)  # the config indexes its schedule over its own epochs
    assert [config.temperature_at(e) for e in range(5)] == [lin.at(e, 4) for e in range(5)]


def test_annealed_noise_follows_the_temperature_and_reaches_the_masks():
    from prunekit.methods.dpp import DPPHooks

    schedule = TemperatureSchedule(start=2.0, end=0.02, mode="exponential")
    plain, annealed = DPPConfig(k=1, n=4, epochs=3, temperature=schedule, noise_scale=3.0), \
        DPPConfig(k=1, n=4, epochs=3, temperature=schedule, noise_scale=3.0, anneal_noise=True)
    assert [plain.noise_at(e) for e in range(3)] == [3.0, 3.0, 3.0]
    assert [round(annealed.noise_at(e), 6) for e in range(4)] == [3.0, 0.3, 0.03, 0.03]  # clamped like T
    assert DPPConfig.from_dict(annealed.to_dict()) == annealed
    mask = KOfNMask(torch.randn(3, 8), annealed)
    hooks = DPPHooks({"layer": mask}, annealed)
    assert mask.noise_scale == 3.0
    model = nn.Linear(1, 1)
    metrics = hooks.epoch_metrics(model, 0)  # epoch 0's row of the training history
    hooks.before_epoch(model, 1)  # the next epoch's noise
    assert mask.noise_scale == pytest.approx(0.3) and metrics["noise_scale"] == pytest.approx(3.0)
    # with the noise annealed away, every training draw is the evaluation mask
    mask.noise_scale, mask.temperature = 0.0, 0.02
    mask.train()
    assert torch.equal(mask.mask(), mask.eval().mask())


def test_logits_get_their_own_learning_rate_and_no_weight_decay():
    from prunekit.methods.dpp import DPPHooks

    layer = nn.Linear(8, 3)
    config = DPPConfig(k=1, n=4, logit_lr_scale=50.0)
    mask = KOfNMask(layer.weight, config)
    parametrize.register_parametrization(layer, "weight", mask)
    groups = DPPHooks({"layer": mask}, config).param_groups(layer)
    assert [len(g["params"]) for g in groups] == [2, 1] and groups[1]["params"][0] is mask.logits
    assert groups[1]["lr_scale"] == 50.0 and groups[1]["weight_decay"] == 0.0
    with pytest.raises(ValueError, match="logit_lr_scale must be > 0"):
        DPPConfig(logit_lr_scale=0.0)


def test_evaluation_mask_is_the_topk_of_the_logits():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0]])
    assert topk_mask(logits, 2).tolist() == [[0.0, 1.0, 0.0, 1.0]]


@pytest.mark.parametrize("kwargs, shape, match", [
    ({"k": 5, "n": 4}, None, "k must be smaller than n"),
    ({"pattern": "row"}, None, "pattern must be one of"),  # was granularity="row", "granularity must be one of"
    ({"k": 1, "n": 3}, (4, 8), "must divide the row length 8"),
    ({"pattern": "kernel", "k": 3}, (4, 3, 3, 3), "k=3 must be smaller than n=3"),
    ({"pattern": "kernel", "k": 1}, (4, 8), "needs a Conv2d weight"),
    ({"tiles": 3, "k": 1, "n": None}, (4, 8), "tiles=3 must divide the row length 8"),
    ({"init_scale": -1.0}, None, "init_scale must be a finite number >= 0"),
    ({"noise_scale": float("nan")}, None, "noise_scale must be a finite number >= 0"),
    ({"logit_lr_scale": float("inf")}, None, "logit_lr_scale must be > 0 and finite"),
])
def test_bad_input_is_a_clear_error(kwargs, shape, match):
    with pytest.raises(ValueError, match=match):
        group_layout(shape, DPPConfig(**kwargs)) if shape else DPPConfig(**kwargs)


def test_temperature_must_be_positive():
    with pytest.raises(ValueError, match="temperature start must be > 0"):
        TemperatureSchedule(start=0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        gumbel_topk_mask(torch.zeros(1, 4), 1, 0.0)


def test_tiles_split_rows_into_groups():
    assert group_layout((4, 12), DPPConfig(k=1, n=None, tiles=3)) == (12, 4)
    assert math.isclose(DPPConfig.from_dict(DPPConfig(k=2, n=8).to_dict()).k, 2)


def test_dpp_training_learns_masks_that_keep_exactly_k_and_logs_metrics(synthetic):
    from prunekit.methods.dpp import dpp_prune_
    from prunekit.models import ModelConfig, create_model
    from prunekit.training import TrainConfig

    torch.manual_seed(0)
    model = create_model(ModelConfig("lenet300", in_channels=1, num_classes=4, input_size=12))
    config = DPPConfig(k=1, n=4, epochs=2, temperature=TemperatureSchedule(1.0, 0.1))
    result = dpp_prune_(model, synthetic, config, TrainConfig(lr=0.05, augment="none"), progress=False)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    for name, mask in result.masks.items():
        weight = model.get_submodule(name).weight
        assert (mask.reshape(-1, 4).sum(1) == 1).all()
        assert torch.equal(weight * (1 - mask), torch.zeros_like(weight))  # the baked weights follow the mask
    assert len(result.metrics) == 2 and result.metrics[1]["temperature"] == pytest.approx(0.1)
    assert all(0 <= v <= 1 for row in result.metrics for k, v in row.items() if k.endswith(("confidence", "diversity")))


@pytest.mark.parametrize("quant, levels", [("bits=3", 7), ("binary", 2)])
def test_joint_quantization_leaves_few_levels_per_layer(synthetic, quant, levels):
    from prunekit.methods.dpp import dpp_prune_
    from prunekit.models import ModelConfig, create_model
    from prunekit.training import TrainConfig

    torch.manual_seed(0)
    model = create_model(ModelConfig("lenet300", in_channels=1, num_classes=4, input_size=12))
    result = dpp_prune_(model, synthetic, DPPConfig(k=2, n=4, quant=quant, epochs=1),
                        TrainConfig(lr=0.05, augment="none"), progress=False)
    for name in result.masks:
        w = model.get_submodule(name).weight.detach()
        assert len(w[w != 0].unique()) <= levels


def test_binary_level_is_the_mean_of_the_kept_weights_as_for_a_fixed_mask():
    """The issue's case: a 200x50 layer at 1-of-10. DPP's binary level must equal the level that masked
    retraining with the same mask gets (mean |w| over the kept weights), not the mean over all latent weights."""
    from prunekit.methods.dpp import KOfNMask, constrain_, ste_quantizer
    from prunekit.planning.constraints import QuantConstraint

    torch.manual_seed(0)
    layer = nn.Linear(50, 200, bias=False)
    weight = layer.weight.detach().clone()
    mask = KOfNMask(weight, DPPConfig(k=1, n=10, quant="binary"))
    constrain_(layer, mask, QuantConstraint.parse("binary"))
    layer.eval()  # the evaluation mask: top-k of the logits
    kept = mask.mask().detach()
    assert (kept.reshape(-1, 10).sum(1) == 1).all()
    dpp_level = layer.weight.detach().abs()[kept.bool()].unique()
    magnitude_level = ste_quantizer("binary")(weight * kept).detach().abs()[kept.bool()].unique()
    assert len(dpp_level) == 1 and torch.allclose(dpp_level, magnitude_level)
    assert dpp_level.item() == pytest.approx(float(weight.abs()[kept.bool()].mean()))
    assert (layer.weight.detach()[~kept.bool()] == 0).all()


def test_ste_quantization_passes_gradients():
    from prunekit.methods.dpp import STEQuantize

    w = torch.tensor([0.5, -2.0, 0.1], requires_grad=True)
    STEQuantize(bits=3)(w).sum().backward()
    assert w.grad.tolist() == [1.0, 1.0, 1.0]
    w.grad = None
    STEQuantize(binary=True)(w).sum().backward()
    assert w.grad.tolist() == [1.0, 0.0, 1.0]  # hard-tanh surrogate: no gradient where |w| > 1
    with pytest.raises(ValueError, match="exactly one of"):
        STEQuantize()


def test_nearest_k_of_n_picks_a_dividing_run_length():
    from prunekit.planning.allocation import nearest_k_of_n

    assert nearest_k_of_n(800, 1, 20) == (1, 20)  # 20 divides 800
    assert nearest_k_of_n(784, 1, 10) == (1, 8)  # 8 and 14 divide 784; 8 is nearer to 10
    assert nearest_k_of_n(784, 5, 20) == (4, 16)
    with pytest.raises(ValueError, match="cannot hold"):
        nearest_k_of_n(1, 1, 4)


def test_k_of_n_for_keep_is_never_denser_than_asked():
    from prunekit.planning.allocation import k_of_n_for_keep

    assert k_of_n_for_keep(800, 0.0883) == (2, 25)  # 2/25 = 0.08; 3/32 would be denser than asked
    assert k_of_n_for_keep(800, 0.25) == (1, 4)  # exact; 2/8 and 8/32 tie and the shorter run wins
    assert k_of_n_for_keep(784, 0.2472) == (3, 14)  # 784's divisors <= 32: 2, 4, 7, 8, 14, 16, 28
    assert k_of_n_for_keep(25, 0.01) == (1, 25)  # nothing is sparse enough: the sparsest there is
    with pytest.raises(ValueError, match="no divisor"):
        k_of_n_for_keep(37, 0.1)  # a prime above max_n
    with pytest.raises(ValueError, match="keep must be in"):
        k_of_n_for_keep(800, 1.0)


def test_plan_k_of_n_keeps_small_layers_dense_and_reaches_the_target():
    from prunekit.planning.allocation import plan_k_of_n

    shapes = {"conv1": (20, 1, 5, 5), "conv2": (50, 20, 5, 5), "fc1": (500, 800), "fc2": (10, 500)}  # LeNet-5
    plan = plan_k_of_n(shapes, 0.9)
    assert set(plan) == {"conv2", "fc1"}  # conv1 (0.1%) and fc2 (1.2%) stay dense
    sizes = {name: math.prod(s) for name, s in shapes.items()}
    kept = sum(sizes[n] * k / nn for n, (k, nn) in plan.items()) + sizes["conv1"] + sizes["fc2"]
    assert 0.9 <= 1 - kept / sum(sizes.values()) < 0.92
    assert all(math.prod(shapes[n][1:]) % nn == 0 and nn <= 32 for n, (_, nn) in plan.items())
    assert set(plan_k_of_n(shapes, 0.9, dense_below=0)) == set(shapes)
    with pytest.raises(ValueError, match="more than 0.5% allows"):
        plan_k_of_n(shapes, 0.995, dense_below=0.05)  # fc2 and conv1 alone exceed the budget
    with pytest.raises(ValueError, match="sparsity must be in"):
        plan_k_of_n(shapes, 1.0)


def test_filter_dpp_on_coupled_groups_meets_the_target_and_removal_is_exact(synthetic):
    """ResNet residual stages couple several convs and BNs: one mask per group zeroes every producer, so the
    trained network (masks baked in) and the physically shrunk one compute the same function."""
    import copy

    from prunekit.channels.graph import ChannelGraph
    from prunekit.measurement.metrics import count_flops
    from prunekit.methods.dpp_filters import GroupMask, dpp_filter_prune_
    from prunekit.models import ModelConfig, create_model
    from prunekit.planning.allocation import Target
    from prunekit.training import TrainConfig

    torch.manual_seed(0)
    net = create_model(ModelConfig("resnet20", in_channels=1, num_classes=4, input_size=12))
    flops = count_flops(net, (1, 1, 12, 12))
    seen = {}
    original_shrink = ChannelGraph.shrink_

    def spy(self, plan, verify=True, atol=1e-5):  # the masked network, just before removal
        seen["masked"] = copy.deepcopy(self.model).eval()
        return original_shrink(self, plan, verify, atol)

    ChannelGraph.shrink_ = spy
    try:
        config = DPPConfig(k=1, n=2, epochs=2, temperature=TemperatureSchedule(1.0, 0.1))
        result = dpp_filter_prune_(net, synthetic, Target("flops", 0.25), config,
                                   TrainConfig(lr=0.05, augment="none"), progress=False)
    finally:
        ChannelGraph.shrink_ = original_shrink
    assert 0.23 < count_flops(net, (1, 1, 12, 12)) / flops <= 0.26
    assert all(k < n for k, n in result.kept.values()) and len(result.metrics) == 2
    assert not any("parametrizations" in n or "_dpp" in n for n, _ in net.named_parameters())
    x = synthetic.test[:16][0]
    torch.testing.assert_close(net.eval()(x), seen["masked"](x), atol=1e-5, rtol=1e-4)
    # a group's draw is shared by its slices within a step and exactly k-hot
    graph = ChannelGraph(create_model(ModelConfig("resnet20", in_channels=1, num_classes=4, input_size=12)),
                         synthetic.train[:2][0])
    mask = GroupMask(graph.groups[0], 3, config)
    first = mask.channel_mask()
    assert first is mask.channel_mask() and float(first.detach().sum()) == 3
    mask.resample()
    assert mask.channel_mask() is not first


def test_filter_dpp_target_that_removes_nothing_is_an_error(synthetic):
    from prunekit.methods.dpp_filters import dpp_filter_prune_
    from prunekit.planning.allocation import Target
    from prunekit.training import TrainConfig

    net = nn.Sequential(nn.Flatten(), nn.Linear(144, 4))
    with pytest.raises(ValueError, match="no prunable channel group|removes no channel"):
        dpp_filter_prune_(net, synthetic, Target("flops", 0.5), DPPConfig(k=1, n=2, epochs=1),
                          TrainConfig(augment="none"), progress=False)
