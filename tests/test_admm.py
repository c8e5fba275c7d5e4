"""ADMM-NN-S: constraints reached, zeros kept through retraining, levels exact after quantization, allocation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prunekit.methods.admm import ADMMConfig, MaskedRetrain, admm_prune_, allocate_rates, constrained_layers
from prunekit.models import ModelConfig, create_model
from prunekit.training import TrainConfig, evaluate, fit

TRAIN = TrainConfig(epochs=1, lr=0.05, batch_size=64, augment="none")


def _lenet300(synthetic, trained: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = create_model(ModelConfig("lenet300", in_channels=1, num_classes=4, input_size=12))
    if trained:
        fit(model, synthetic, TrainConfig(epochs=4, lr=0.05, batch_size=64, augment="none"), progress=False)
    return model


def _quiet(*_):
    pass


def test_unstructured_admm_reaches_the_rate_and_zeros_survive_retraining(synthetic):
    model = _lenet300(synthetic, trained=True)
    dense_acc = evaluate(model, synthetic.val)["acc"]
    # 8 steps per epoch: a strong rho
    config = ADMMConfig(target="params=0.1", admm_epochs=3, retrain_epochs=1)
    result = admm_prune_(model, synthetic, config, TRAIN, progress=False, log=_quiet)
    assert result.kept_fraction() == pytest.approx(0.1, abs=0.01)
    for name, module in constrained_layers(model, config, synthetic.train[:2][0]).items():
        assert torch.equal(module.weight * (1 - result.masks[name]), torch.zeros_like(module.weight))
    # 8 steps per epoch, fewer than update_every: one Z/U update per epoch
    assert len(result.residuals["stage-1"]["prune"]) == 3
    before, after = result.residuals["stage-1"]["removed_energy"]
    assert after < 0.5 * before  # ADMM moved the weights towards the constraint set
    assert evaluate(model, synthetic.val)["acc"] >= dense_acc - 0.1


def test_frequent_updates_and_a_rising_rho_converge_where_one_update_an_epoch_does_not(synthetic):
    """The issue's measurement in small: Z/U every few steps with rho rising to rho_max leaves the hard projection
    nothing to remove; the old schedule (one update an epoch, small rho) leaves a large residual."""
    removed = {}
    for every, rho_max in ((0, 0.003), (2, 100.0)):
        model = _lenet300(synthetic, trained=True)
        config = ADMMConfig(target="params=0.05", rho=1e-3, rho_max=rho_max, update_every=every, admm_epochs=3,
                            retrain_epochs=0)
        result = admm_prune_(model, synthetic, config, TRAIN, progress=False, log=_quiet)
        assert len(result.residuals["stage-1"]["prune"]) == (3 if every == 0 else 12)
        removed[every] = result.stages[0]["removed_energy"]
        assert result.stages[0]["converged"] is (removed[every] <= 0.01)
    assert removed[2] < 0.01 < removed[0]


def test_stages_keep_earlier_zeros_and_reach_the_target(synthetic, tmp_path):
    from prunekit.planning.schedule import Phases

    model = _lenet300(synthetic, trained=True)
    config = ADMMConfig(target="params=x10", stages={"rates": (2, 4)}, admm_epochs=1, retrain_epochs=1,
                        update_every=4)
    result = admm_prune_(model, synthetic, config, TRAIN, progress=False, log=_quiet, phases=Phases(tmp_path))
    assert [round(s["keep_target"], 4) for s in result.stages] == [0.5, 0.25, 0.1]
    assert result.kept_fraction() == pytest.approx(0.1, abs=0.01) and result.selected == 2
    masks = [torch.load(tmp_path / f"stage-{i}-projection.pt", weights_only=True)["tensors"] for i in (1, 2, 3)]
    for earlier, later in zip(masks, masks[1:]):
        for name in earlier:
            assert not (later[name].bool() & ~earlier[name].bool()).any(), name  # zeros stay zero
    assert set(result.residuals) == {"stage-1", "stage-2", "stage-3"}
    # a resumed run loads every stage and ends with the same weights
    again = _lenet300(synthetic, trained=True)
    resumed = admm_prune_(again, synthetic, config, TRAIN, progress=False, log=_quiet, phases=Phases(tmp_path))
    assert resumed.selected == 2 and all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                                          again.state_dict().values()))


def test_a_stage_beyond_the_tolerance_stops_the_run_and_the_stage_before_is_kept(synthetic, tmp_path):
    from prunekit.planning.schedule import Phases

    model = _lenet300(synthetic, trained=True)
    config = ADMMConfig(target="params=0.0005", stages={"rates": (2,), "tolerance": 10.0}, admm_epochs=0,
                        retrain_epochs=1)
    result = admm_prune_(model, synthetic, config, TRAIN, progress=False, log=_quiet, phases=Phases(tmp_path))
    assert [s["within_tolerance"] for s in result.stages] == [True, False]
    assert result.selected == 0 and result.kept_fraction() == pytest.approx(0.5, abs=0.01)
    stage_one = torch.load(tmp_path / "stage-1-retrain.pt", weights_only=True)["model"]
    assert all(torch.equal(stage_one[k], v) for k, v in model.state_dict().items())
    assert evaluate(model, synthetic.val)["acc"] == result.stages[0]["val_acc"]


def test_masked_retraining_keeps_zeros_and_their_momentum_zero(synthetic):
    model = _lenet300(synthetic)
    layers = {"fc1": model.fc1} if hasattr(model, "fc1") else dict(list(
        (n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear))[:1])
    name, layer = next(iter(layers.items()))
    mask = (torch.rand_like(layer.weight) > 0.5).float()
    with torch.no_grad():
        layer.weight.mul_(mask)
    hooks = MaskedRetrain(layers, {name: mask})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    x, y = synthetic.train[:32]
    for step in range(3):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        hooks.after_step(model, optimizer, step)
    assert torch.equal(layer.weight * (1 - mask), torch.zeros_like(layer.weight))
    assert torch.equal(optimizer.state[layer.weight]["momentum_buffer"] * (1 - mask), torch.zeros_like(mask))


@pytest.mark.parametrize("quant, top", [("bits=3", 4), ("binary", 1), ("ternary", 1)])
def test_joint_quantization_puts_every_kept_weight_on_its_levels(synthetic, quant, top):
    model = _lenet300(synthetic)
    config = ADMMConfig(target="params=0.2", quant=quant, admm_epochs=1, retrain_epochs=1, quant_steps=(0.5, 1.0))
    result = admm_prune_(model, synthetic, config, TRAIN, progress=False, log=_quiet)
    for name, module in constrained_layers(model, config, synthetic.train[:2][0]).items():
        w, q = module.weight.detach(), result.scales[name]
        levels = w / q
        kept = result.masks[name].bool()
        assert torch.allclose(levels, levels.round(), atol=1e-4)
        assert levels.round().abs().max() <= top and (w[~kept] == 0).all()
        if quant != "ternary":
            assert (levels[kept].round().abs() >= 1).all()  # zero is reserved for pruned weights


def test_structured_patterns_remove_whole_slices(synthetic):
    torch.manual_seed(0)
    model = create_model(ModelConfig("lenet5", in_channels=1, num_classes=4, input_size=12))
    config = ADMMConfig(pattern="filter", target="params=0.5", admm_epochs=1, retrain_epochs=0, include_output=False)
    result = admm_prune_(model, synthetic, config, TRAIN, progress=False, log=_quiet)
    for name, mask in result.masks.items():
        rows = mask.reshape(mask.shape[0], -1)
        assert ((rows.sum(1) == 0) | (rows.sum(1) == rows.shape[1])).all(), name
    config = ADMMConfig(pattern="k-of-n", target=None, k=1, n=4, admm_epochs=0, retrain_epochs=0)
    model = _lenet300(synthetic)
    result = admm_prune_(model, synthetic, config, TRAIN, progress=False, log=_quiet)
    for mask in result.masks.values():
        assert (mask.reshape(-1, 4).sum(1) == 1).all()


def test_global_allocation_meets_the_overall_rate_and_rates_override(synthetic):
    model = _lenet300(synthetic)
    layers = constrained_layers(model, ADMMConfig(), synthetic.train[:2][0])
    rates = allocate_rates(layers, ADMMConfig(target="params=0.05"))
    total = sum(m.weight.numel() for m in layers.values())
    kept = sum(rates[n] * m.weight.numel() for n, m in layers.items())
    assert kept / total == pytest.approx(0.05, rel=0.05)
    assert len(set(round(r, 4) for r in rates.values())) > 1  # layers differ
    first = next(iter(layers))
    assert allocate_rates(layers, ADMMConfig(target="params=0.05", rates={first: 0.5}))[first] == 0.5
    assert set(allocate_rates(layers, ADMMConfig(target="params=0.3", allocation="uniform")).values()) == {0.3}
    with pytest.raises(ValueError, match="not constrained"):
        allocate_rates(layers, ADMMConfig(rates={"nope": 0.5}))


def test_sensitivity_allocation_spares_the_layer_whose_loss_rises(synthetic):
    from prunekit.planning.allocation import InfeasibleTargetError, sensitivity_rates
    from prunekit.planning.pattern import Pattern

    weights = {"big": torch.randn(100, 100), "small": torch.randn(10, 100)}

    def loss_with(name: str, keep: float) -> float:  # "big" hurts as soon as it is pruned hard
        return (1 - keep) * (100.0 if name == "big" else 1.0)

    rates = sensitivity_rates(weights, Pattern.UNSTRUCTURED, 0.5, loss_with)
    kept = sum(rates[n] * w.numel() for n, w in weights.items()) / sum(w.numel() for w in weights.values())
    assert kept == pytest.approx(0.5)
    assert rates["small"] < rates["big"] < 1
    assert sensitivity_rates(weights, Pattern.UNSTRUCTURED, 0.5, loss_with, fixed={"big": 0.5})["big"] == 0.5
    with pytest.raises(InfeasibleTargetError, match="less than one filter unit"):
        sensitivity_rates(weights, Pattern.FILTER, 0.001, loss_with)


def test_admm_with_the_sensitivity_allocation_meets_the_rate(synthetic):
    model = _lenet300(synthetic, trained=True)
    config = ADMMConfig(target="params=0.05", allocation="sensitivity", admm_epochs=0, retrain_epochs=0)
    result = admm_prune_(model, synthetic, config, TRAIN, progress=False, log=_quiet)
    assert result.kept_fraction() == pytest.approx(0.05, abs=0.005)
    assert min(result.rates.values()) >= 0.001  # no layer starved to nothing


@pytest.mark.parametrize("kwargs, match", [
    ({"target": "params=1.0"}, "keep fraction must be in"),  # was keep=1.0, "keep must be a fraction"
    ({"pattern": "k-of-n", "target": None, "k": 4, "n": 4}, "k < n"),
    ({"quant": "bits=0"}, "bits must be an int >= 1"),
    ({"rho": 0}, "rho must be > 0"),
    ({"quant_steps": (0.5, 0.9)}, "end at 1.0"),
    ({"rates": {"fc": 0}}, "keep fraction in"),
    ({"admm_epochs": -1}, "admm_epochs must be an int >= 0"),
    ({"pattern": "group", "target": "flops=1.0"}, "keep fraction must be in"),
    ({"pattern": "group", "target": "latency=0.5"}, "admm does not take latency= targets"),
    ({"rho": 0.1, "rho_max": 0.01}, "rho_max between rho and 1e4"),
    ({"target": "params=x10", "stages": {"rates": (5, 20)}}, "below the target's x10"),
    ({"target": "params=x10", "stages": {"rates": (5, 2)}}, "stage rates must rise"),
    ({"stages": {"rates": (1,)}}, "each be > 1"),
    ({"stages": {"tolerance": -1}}, "between 0 and 100"),
    ({"pattern": "k-of-n", "target": None, "k": 1, "n": 4, "stages": {"rates": (2,)}}, "runs in one stage"),
    ({"allocation": "sideways"}, "allocation"),
    ({"admm_epochs": 0, "rho_max": 10.0}, r"rho_max=10.0 set the ADMM phases, and admm_epochs is 0"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ADMMConfig(**kwargs)


def test_config_round_trips():
    c = ADMMConfig(pattern="column", target="params=0.3", quant="bits=4", rates={"fc": 0.5}, quant_steps=(0.5, 1.0))
    assert ADMMConfig.from_dict(c.to_dict()) == c
    c = ADMMConfig(target="params=x100", stages={"rates": (10, 30), "tolerance": 1.0}, allocation="sensitivity")
    assert ADMMConfig.from_yaml(c.to_yaml()) == c


def test_fit_without_selection_keeps_the_last_epoch(synthetic):
    model = _lenet300(synthetic)
    r = fit(model, synthetic, TrainConfig(epochs=2, lr=0.05, augment="none"), progress=False, select_best=False)
    assert r.best_epoch == 2


def test_storage_report_counts_indices_and_prefers_the_smallest_format(synthetic):
    from prunekit.measurement.formats import encode, value_codec

    model = _lenet300(synthetic)
    config = ADMMConfig(target="params=0.05", quant="bits=3", admm_epochs=0, retrain_epochs=0, quant_steps=(1.0,))
    result = admm_prune_(model, synthetic, config, TRAIN, progress=False, log=_quiet)
    from prunekit.methods.admm import storage_report

    report = storage_report(model, result, config)
    layers = dict(model.named_modules())
    constrained_bits = sum(encode(layers[n].weight.detach(), "csr", value_codec(
        layers[n].weight.detach(), 3, result.scales[n])).bits for n in result.masks)
    others = sum(32 * p.numel() for n, p in model.named_parameters() if not n.endswith("weight")
                 or n.rsplit(".", 1)[0] not in result.masks)
    assert report["bits"]["csr"] == constrained_bits + others
    assert report["best"] == min(report["bits"], key=report["bits"].get)
    assert 9 < report["compression"]["dense"] < 32 / 3  # dense layout of 3-bit codes; biases stay float32
    assert report["compression"][report["best"]] > 20


def test_channel_pattern_zeros_are_removed_physically_and_exactly(synthetic):
    from prunekit.measurement.metrics import count_flops
    from prunekit.methods.admm import shrink_zero_channels_

    torch.manual_seed(0)
    model = create_model(ModelConfig("vgg11", in_channels=1, num_classes=4, input_size=12, width=0.25))
    config = ADMMConfig(pattern="channel", target="params=0.5", admm_epochs=0, retrain_epochs=0, include_output=False)
    admm_prune_(model, synthetic, config, TRAIN, progress=False, log=_quiet)
    model.eval()
    x = synthetic.test[:8][0]
    before, flops = model(x), count_flops(model, (1, 1, 12, 12))
    removed = shrink_zero_channels_(model, synthetic.train[:2][0]).num_removed()
    assert removed > 0 and count_flops(model, (1, 1, 12, 12)) < flops
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)


def test_filter_zeros_before_batchnorm_stay_because_beta_still_flows(synthetic):
    from prunekit.methods.admm import shrink_zero_channels_

    torch.manual_seed(0)
    model = create_model(ModelConfig("vgg11", in_channels=1, num_classes=4, input_size=12, width=0.25))
    with torch.no_grad():
        model.get_submodule(next(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d))).weight[0] = 0
    assert not shrink_zero_channels_(model.eval(), synthetic.train[:2][0])


def test_group_projection_removes_the_channels_brute_force_finds_nearest():
    """One coupled group (a hidden layer's 6 units: rows of fc1, columns of fc2) and a channels target: the
    projection must zero the 3 units whose removal loses the least weight energy, as brute force finds."""
    import itertools

    from prunekit.methods.admm import GroupProjection
    from prunekit.planning.allocation import Target

    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 6, bias=False), nn.ReLU(), nn.Linear(6, 6, bias=False), nn.ReLU(),
                          nn.Linear(6, 3))
    layers = {"0": model[0], "2": model[2]}
    projection = GroupProjection(model, layers, torch.randn(2, 4), Target("channels", 0.5))
    weights = {n: torch.randn_like(m.weight) for n, m in layers.items()}
    z = projection(weights)

    def energy_without(units: tuple[int, ...]) -> float:  # units of the first hidden layer only
        w0, w2 = weights["0"].clone(), weights["2"].clone()
        w0[list(units)], w2[:, list(units)] = 0, 0
        return float((weights["0"] - w0).pow(2).sum() + (weights["2"] - w2).pow(2).sum())

    removed = [i for i in range(6) if bool((z["0"][i] == 0).all())]
    assert all(bool((z["2"][:, i] == 0).all()) for i in removed)  # the coupled slices go together
    # removing half of all 12 hidden channels: check the choice inside the first group by brute force
    best = min(itertools.combinations(range(6), len(removed)), key=energy_without)
    assert sorted(best) == removed
    z2 = projection(z)  # a projection is idempotent
    assert all(torch.equal(z2[n], z[n]) for n in z)


def test_group_admm_meets_the_flops_target_and_the_saved_model_replays(synthetic, tmp_path):
    from prunekit.measurement.metrics import count_flops
    from prunekit.persistence.architecture import load_compressed, save_compressed

    torch.manual_seed(0)
    config_model = ModelConfig("resnet20", in_channels=1, num_classes=4, input_size=12)
    model = create_model(config_model)
    flops = count_flops(model, (1, 1, 12, 12))
    params = sum(p.numel() for p in model.parameters())
    config = ADMMConfig(pattern="group", target="flops=0.25", admm_epochs=1, retrain_epochs=1, rho=0.05)
    result = admm_prune_(model, synthetic, config, TRAIN, progress=False, log=_quiet)
    assert result.change["kind"] == "channels" and result.residuals["stage-1"]["prune"]
    got = count_flops(model, (1, 1, 12, 12)) / flops
    assert 0.23 < got <= 0.26
    assert result.kept_fraction() < 0.5 and result.dense_bits == 32 * params
    model.eval()
    path = save_compressed(tmp_path / "g.safetensors", model, config_model.to_dict(), [result.change])
    loaded, _ = load_compressed(path)
    x = synthetic.test[:8][0]
    torch.testing.assert_close(loaded(x), model(x))


def test_group_pattern_has_no_per_layer_projection():
    from prunekit.planning.constraints import SparsityConstraint

    with pytest.raises(ValueError, match="spans coupled layers"):
        SparsityConstraint("group", 0.5)


def test_group_pattern_with_quantization_is_costed_as_codes(synthetic):
    """The coupled channels leave physically and the kept weights are on levels: the storage counts their codes
    (the shrunk layers are the encoding's layers), not float32."""
    import prunekit
    from prunekit.measurement.formats import encoding_storage

    torch.manual_seed(0)
    model = create_model("lenet5", num_classes=4, in_channels=1, input_size=12, width=0.5)
    record = prunekit.prune_(model, ADMMConfig(pattern="group", target="flops=0.5", quant="bits=4", admm_epochs=1,
                                               retrain_epochs=1, quant_steps=(1.0,)), synthetic,
                             prunekit.RunContext(train=TrainConfig(epochs=0, lr=0.01), log=lambda *_: None,
                                                 progress=False))
    assert record.changes and record.encoding["masked_layers"]
    coded = encoding_storage(model, record.encoding)
    as_float = encoding_storage(model, {**record.encoding, "quant": "none"})
    assert coded["values"] == "4-bit codes" and coded["bits"]["dense"] < as_float["bits"]["dense"] / 4


@pytest.mark.parametrize("rho_max, converged", [(1e-3, False), (100.0, True)])
def test_the_report_says_whether_admm_converged_and_draws_the_residuals(synthetic, tmp_path, rho_max, converged):
    import prunekit

    model = _lenet300(synthetic, trained=True)
    config = ADMMConfig(target="params=0.05", rho=1e-3, rho_max=rho_max, update_every=2, admm_epochs=3,
                        retrain_epochs=0)
    record = prunekit.prune_(model, config, synthetic, prunekit.RunContext(train=TRAIN, progress=False, log=_quiet))
    assert record.results["converged"] is converged
    (stage,) = record.results["stages"]
    per_update = record.results["residuals"]["stage-1"]["removed_energy_per_update"]
    assert len(per_update) == 12 and per_update[-1] == pytest.approx(stage["removed_energy"], rel=0.5, abs=1e-6)
    unconverged = [n for n in record.notes if n.startswith("ADMM ended unconverged")]
    assert bool(unconverged) is not converged
    if unconverged:
        assert f"removed {100 * stage['removed_energy']:.1f}% of the weights' energy" in unconverged[0]
    path = record.figures["admm_residuals.png"](tmp_path / "admm_residuals.png")
    assert path.stat().st_size > 1000
