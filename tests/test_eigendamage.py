"""EigenDamage: exact re-parameterisation at full rank, KFE scores as the K-FAC quadratic model, targets met,
iterative merging, the depthwise form, save/load of bottleneck models."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from prunekit.curvature.kfac import (
    ConvFactor,
    CurvatureConfig,
    FisherSettings,
    FisherType,
    KroneckerFactors,
    collect_kfac,
)
from prunekit.measurement.metrics import count_flops, count_params
from prunekit.methods.eigendamage import (
    BottleneckForm,
    EigenDamageConfig,
    KFEBottleneck,
    bottleneck_from_factors,
    eigendamage_round_,
)
from prunekit.methods.registry import RunContext, prune_
from prunekit.models import ModelConfig, create_model
from prunekit.persistence.architecture import load_compressed
from prunekit.planning.allocation import InfeasibleTargetError, Target
from prunekit.planning.schedule import RoundSchedule


def _random_factors(n_in: int, n_out: int, seed: int = 0) -> KroneckerFactors:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n_in, n_in, generator=g, dtype=torch.float64)
    b = torch.randn(n_out, n_out, generator=g, dtype=torch.float64)
    return KroneckerFactors(a @ a.T + 0.1 * torch.eye(n_in, dtype=torch.float64),
                            b @ b.T + 0.1 * torch.eye(n_out, dtype=torch.float64), False, ConvFactor.CHANNEL)


@pytest.mark.parametrize("layer, shape", [
    (nn.Conv2d(3, 5, 3, stride=2, padding=2, dilation=2, bias=True), (2, 3, 9, 9)),
    (nn.Conv2d(4, 6, (3, 1), padding=(1, 0), bias=False), (2, 4, 7, 7)),
    (nn.Linear(7, 4), (2, 5, 7)),
])
def test_full_rank_bottleneck_computes_exactly_what_the_layer_did(layer, shape):
    torch.manual_seed(0)
    out_ch = layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
    in_ch = layer.in_channels if isinstance(layer, nn.Conv2d) else layer.in_features
    bottleneck = bottleneck_from_factors(layer, _random_factors(in_ch, out_ch))
    x = torch.randn(*shape)
    torch.testing.assert_close(bottleneck(x), layer(x), atol=1e-5, rtol=1e-5)
    assert (bottleneck.rank_in, bottleneck.rank_out) == (in_ch, out_ch)


def test_kfe_score_is_the_kfac_quadratic_model_of_zeroing_one_eigen_entry():
    torch.manual_seed(0)
    layer = nn.Linear(4, 3, bias=False)
    f = _random_factors(4, 3, seed=1)
    la, qa, lg, qg = f.eigh()
    w = layer.weight.detach().double()
    rotated = qg.T @ w @ qa
    H = torch.kron(f.G, f.A)
    for i, j in [(0, 0), (1, 3), (2, 2)]:
        delta = -rotated[i, j] * torch.outer(qg[:, i], qa[:, j])
        quad = 0.5 * delta.reshape(-1) @ H @ delta.reshape(-1)
        assert float(quad) == pytest.approx(float(0.5 * rotated[i, j] ** 2 * lg[i] * la[j]), rel=1e-9)


def test_depthwise_form_is_exact_when_every_input_directions_kernels_have_rank_one():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=True)
    with torch.no_grad():  # W[o, i] = M[o, i] * v: every (rotated) input direction has rank-1 kernels
        conv.weight.copy_(torch.randn(4, 3)[:, :, None, None] * torch.randn(3, 3)[None, None])
    bottleneck = bottleneck_from_factors(conv, _random_factors(3, 4), form=BottleneckForm.DEPTHWISE)
    assert bottleneck.core.groups == 3 and bottleneck.core.weight.shape == (3, 1, 3, 3)
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(bottleneck(x), conv(x), atol=1e-5, rtol=1e-5)


def _tiny_resnet() -> nn.Module:
    torch.manual_seed(0)
    return create_model(ModelConfig("resnet20", in_channels=1, num_classes=4, input_size=12, width=0.5))


def _batches(synthetic, n: int = 2):
    return [synthetic.train[i * 64:(i + 1) * 64] for i in range(n)]


@pytest.mark.parametrize("metric, keep", [("flops", 0.25), ("params", 0.3)])
def test_round_meets_the_target_and_the_prediction_is_exact(metric, keep, synthetic):
    model = _tiny_resnet()
    example = synthetic.train[:2][0]
    before = count_flops(model, (1, 1, 12, 12)) if metric == "flops" else count_params(model)
    done = eigendamage_round_(model, _batches(synthetic), example, Target(metric, keep), CurvatureConfig(batches=2),
                              0.9, EigenDamageConfig())
    after = count_flops(model, (1, 1, 12, 12)) if metric == "flops" else count_params(model)
    assert after / before == pytest.approx(keep, rel=0.02)
    assert done.predicted_keep == pytest.approx(after / before, rel=1e-9)
    assert done.change["kind"] == "eigenbasis" and done.change["layers"]
    assert "fc" not in done.change["layers"]  # the classifier keeps its outputs and is left alone
    assert all(isinstance(model.get_submodule(n), KFEBottleneck) for n in done.change["layers"])


def test_layers_where_a_bottleneck_would_be_larger_stay_dense(synthetic):
    model = _tiny_resnet()
    eigendamage_round_(model, _batches(synthetic), synthetic.train[:2][0], Target("flops", 0.8),
                       CurvatureConfig(batches=2), 0.9, EigenDamageConfig())
    for name, m in model.named_modules():
        if isinstance(m, KFEBottleneck):
            from prunekit.methods.eigendamage import layer_cost
            from prunekit.planning.allocation import TargetMetric
            factored = layer_cost(m.spec, 1, 1, (m.rank_in, m.rank_out), m.form, TargetMetric.PARAMS)
            dense = layer_cost(m.spec, 1, 1, None, m.form, TargetMetric.PARAMS)
            assert factored < dense, name
    assert isinstance(model.conv1, nn.Conv2d)  # 1 input channel: a bottleneck can never be smaller


def test_iterative_rounds_merge_rotations_so_layers_stay_three_deep_and_reload(synthetic, tmp_path):
    model = _tiny_resnet()
    base = ModelConfig("resnet20", in_channels=1, num_classes=4, input_size=12, width=0.5).to_dict()
    config = EigenDamageConfig(target="flops=0.3", schedule=RoundSchedule(iterations=2),
                               curvature=FisherSettings(fisher_batches=2))
    dense = count_flops(model, (1, 1, 12, 12))
    result = prune_(model, config, synthetic, RunContext(folder=tmp_path, base=base, progress=False,
                                                         log=lambda s: None))  # prunes model in place
    checkpoint = tmp_path / "round_2" / "pruned.safetensors"  # the last round's saved model
    assert count_flops(model, (1, 1, 12, 12)) / dense == pytest.approx(0.3, rel=0.02)
    bottlenecks = [m for m in model.modules() if isinstance(m, KFEBottleneck)]
    assert bottlenecks and all(not isinstance(c, KFEBottleneck) for b in bottlenecks for c in b.children())
    assert len(result.changes) == 2
    loaded, _ = load_compressed(checkpoint)
    x = synthetic.test[:8][0]
    torch.testing.assert_close(loaded(x), model.eval()(x))
    code = ("import sys, torch; from prunekit.persistence.architecture import load_compressed; "
            "m, _ = load_compressed(sys.argv[1]); torch.manual_seed(0); x = torch.randn(3, 1, 12, 12); "
            "print(repr(m(x).sum().item()))")
    out = subprocess.run([sys.executable, "-c", code, str(checkpoint)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    torch.manual_seed(0)
    assert float(out.stdout.strip()) == pytest.approx(model(torch.randn(3, 1, 12, 12)).sum().item(), abs=1e-4)


def test_depthwise_form_runs_meets_the_target_and_reloads(synthetic, tmp_path):
    model = _tiny_resnet()
    base = ModelConfig("resnet20", in_channels=1, num_classes=4, input_size=12, width=0.5).to_dict()
    config = EigenDamageConfig(target="flops=0.5", curvature=FisherSettings(fisher_batches=2), form="depthwise")
    dense = count_flops(model, (1, 1, 12, 12))
    prune_(model, config, synthetic, RunContext(folder=tmp_path, base=base, progress=False, log=lambda s: None))
    # a layer's first removed direction turns it depthwise at once, so the target is met from below
    assert 0.4 < count_flops(model, (1, 1, 12, 12)) / dense <= 0.5 * 1.02
    depthwise = [m for m in model.modules() if isinstance(m, KFEBottleneck)]
    assert depthwise and all(m.form is BottleneckForm.DEPTHWISE and m.core.groups == m.rank_in for m in depthwise)
    loaded, _ = load_compressed(tmp_path / "round_1" / "pruned.safetensors")
    x = synthetic.test[:8][0]
    torch.testing.assert_close(loaded(x), model.eval()(x))


def test_frozen_rotations_are_not_trained(synthetic):
    model = _tiny_resnet()
    eigendamage_round_(model, _batches(synthetic), synthetic.train[:2][0], Target("flops", 0.4),
                       CurvatureConfig(batches=1), 0.9, EigenDamageConfig(train_rotations=False))
    b = next(m for m in model.modules() if isinstance(m, KFEBottleneck))
    assert not b.project_in.weight.requires_grad and not b.project_out.weight.requires_grad
    assert b.core.weight.requires_grad


def test_eigendamage_bad_input_gives_clear_errors(synthetic):
    with pytest.raises(ValueError, match="not channels"):
        EigenDamageConfig(target="channels=0.5")
    with pytest.raises(ValueError, match="form must be one of"):
        EigenDamageConfig(form="svd")
    model = _tiny_resnet()
    with pytest.raises(InfeasibleTargetError, match="cannot reach flops"):
        eigendamage_round_(model, _batches(synthetic, 1), synthetic.train[:2][0], Target("flops", 0.01),
                           CurvatureConfig(batches=1), 0.5, EigenDamageConfig())
    only_output = nn.Sequential(nn.Flatten(), nn.Linear(144, 4))
    with pytest.raises(ValueError, match="no Linear/Conv2d layer to decompose"):
        eigendamage_round_(only_output, _batches(synthetic, 1), synthetic.train[:2][0], Target("flops", 0.5),
                           CurvatureConfig(batches=1), 0.9, EigenDamageConfig())
    with pytest.raises(ValueError, match="depthwise form needs a convolution"):
        from prunekit.methods.eigendamage import LayerSpec
        KFEBottleneck(LayerSpec("linear", 4, 4), 2, 2, BottleneckForm.DEPTHWISE)


def test_channel_form_factors_of_a_real_model_drive_the_scores(synthetic):
    """The factors EigenDamage uses are the channel form (C_in x C_in) for convolutions."""
    model = _tiny_resnet()
    f = collect_kfac(model, _batches(synthetic, 1), CurvatureConfig(fisher=FisherType.TRUE, batches=1),
                     ["layer1.0.conv1"], conv_factor=ConvFactor.CHANNEL)["layer1.0.conv1"]
    conv = model.layer1[0].conv1
    assert f.A.shape == (conv.in_channels,) * 2 and f.G.shape == (conv.out_channels,) * 2


def test_round_on_a_train_mode_model_with_1x1_batchnorm_leaves_running_statistics_alone(synthetic):
    # VGG-11 on 28x28 images ends in a BatchNorm over 1x1 maps: a single train-mode example cannot pass it
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.ReLU(), nn.Flatten(), nn.Linear(16, 4)).train()
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    eigendamage_round_(model, _batches(synthetic), synthetic.train[:2][0], Target("flops", 0.5),
                       CurvatureConfig(batches=2), 0.9, EigenDamageConfig())
    assert model.training
    for k, v in stats.items():
        assert torch.equal(model.state_dict()[k], v), k


def test_the_cap_counts_against_the_dense_width_so_rounds_cannot_compound(synthetic):
    """Two rounds at max_per_layer=0.5: every bottleneck keeps at least half of its dense layer's directions on
    each side (before, the second round capped against the first round's rank, allowing 75% removal)."""
    model = _tiny_resnet()
    config = EigenDamageConfig(target="flops=0.6", max_per_layer=0.5, schedule=RoundSchedule(iterations=2),
                               curvature=FisherSettings(fisher_batches=2))
    prune_(model, config, synthetic, RunContext(progress=False, log=lambda s: None))
    bottlenecks = [m for m in model.modules() if isinstance(m, KFEBottleneck)]
    assert bottlenecks
    for m in bottlenecks:
        assert m.rank_in >= m.spec.in_channels / 2 and m.rank_out >= m.spec.out_channels / 2


def test_remove_lowest_caps_against_the_dense_width():
    from prunekit.planning.allocation import RankedLayer, remove_lowest

    def layer(dense):
        return RankedLayer("a", (torch.arange(8.0),), lambda kept: float(kept[0]), 8.0, (True,), dense)

    removed, _, _ = remove_lowest([layer(None)], 0.0, 4.0, 0.5)
    assert len(removed["a"][0]) == 4  # 8 now, half may go
    with pytest.raises(InfeasibleTargetError, match="dense directions"):
        remove_lowest([layer((64,))], 0.0, 4.0, 0.9, what="directions")  # 8 of 64 left: already at the cap
