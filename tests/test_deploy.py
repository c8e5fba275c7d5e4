"""Inference form and deployment: BatchNorm folding is exact, exports match PyTorch for dense, channel-pruned and
EigenDamage-bottleneck models, the limit network matches the FLOPs, and `prunekit bench` reports consistent ratios."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from prunekit.cli import main
from prunekit.jobs import export_job, width_builder
from prunekit.measurement.deploy import fold_batchnorm, measure_against_limit, op_profile, uniform_width_model
from prunekit.measurement.metrics import count_flops
from prunekit.methods.registry import RunContext, get_method, prune_
from prunekit.persistence.architecture import save_compressed
from test_pruning import small_resnet


def _trained_stats(model: nn.Module) -> nn.Module:
    """Give every BatchNorm non-trivial affine parameters and running statistics."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g))
    return model.eval()


def test_folding_is_exact_and_only_folds_a_batchnorm_that_is_its_layers_only_reader():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn_in = nn.BatchNorm2d(3)  # no layer before it: stays
            self.conv = nn.Conv2d(3, 4, 3, bias=False)
            self.bn = nn.BatchNorm2d(4)  # folds (the conv has no bias: one is created)
            self.shared = nn.Conv2d(4, 4, 1)
            self.bn_shared = nn.BatchNorm2d(4)  # the conv's output is also read by the residual: stays
            self.fc = nn.Linear(4, 5)
            self.bn_fc = nn.BatchNorm1d(5)  # folds into the linear layer

        def forward(self, x):
            h = self.bn(self.conv(self.bn_in(x)))
            s = self.shared(h)
            h = self.bn_shared(s) + s
            return self.bn_fc(self.fc(h.mean((2, 3))))

    model = _trained_stats(Net())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded, count = fold_batchnorm(model)
    assert count == 2
    names = {n for n, _ in folded.named_modules()}
    assert {"bn_in", "bn_shared"} <= names and not {"bn", "bn_fc"} & names
    x = torch.randn(6, 3, 7, 7)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # the original is untouched


def test_untraceable_models_get_a_clear_error():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else x

    with pytest.raises(ValueError, match="cannot trace Branchy"):
        fold_batchnorm(Branchy())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, synthetic):
    """Dense, channel-pruned (L1, re-fitted) and EigenDamage checkpoints of a small ResNet-20 with real BN stats."""
    out = tmp_path_factory.mktemp("deploy")
    paths = {}
    dense, base = small_resnet(synthetic)
    _trained_stats(dense)
    paths["dense"] = save_compressed(out / "dense.safetensors", dense, base, [], {})
    for method in ("l1", "eigendamage"):
        model = copy.deepcopy(dense).train()
        record = prune_(model, get_method(method).config(target="flops=0.4"), synthetic,
                        RunContext(base=base, log=lambda *_: None, progress=False))  # prunes model in place
        paths[method] = save_compressed(out / f"{method}.safetensors", model, base, record.changes, {})
    return paths


@pytest.mark.parametrize("which", ["dense", "l1", "eigendamage"])
def test_onnx_and_pt2_exports_match_pytorch(checkpoints, tmp_path, which):
    lines = export_job(checkpoints[which], onnx=tmp_path / "m.onnx", pt2=tmp_path / "m.pt2", atol=1e-4)
    assert (tmp_path / "m.onnx").is_file() and (tmp_path / "m.pt2").is_file()
    assert "BatchNorm folded" in lines[0] and "matches" in lines[0] and "matches" in lines[1]
    folded = int(lines[0].split("(")[1].split()[0])
    assert folded >= 19  # every conv of the ResNet-20 is followed by a BatchNorm


def test_limit_network_has_the_nearest_flops_of_any_width(checkpoints):
    from prunekit.persistence.architecture import load_compressed

    pruned, meta = load_compressed(checkpoints["l1"])
    build = width_builder(meta["model"])
    shape = (1, 12, 12)
    target = count_flops(pruned, (1, *shape))
    limit, width = uniform_width_model(build, target, shape)
    got = count_flops(limit, (1, *shape))
    for w in (width * 0.9, width * 1.1):  # no nearby width comes closer
        assert abs(got - target) <= abs(count_flops(build(w), (1, *shape)) - target)
    with pytest.raises(ValueError, match="flops must be in"):
        uniform_width_model(build, 10 * count_flops(build(1.0), (1, *shape)), shape)


def test_latency_rows_are_consistent_ratios(checkpoints):
    from prunekit.persistence.architecture import build_base, load_compressed

    pruned, meta = load_compressed(checkpoints["l1"])
    result = measure_against_limit(pruned, build_base(meta["model"]), (1, 12, 12), width_builder(meta["model"]),
                                   threads=1, batches=(1, 8), repeats=1, min_run_time=0.01)
    assert [(r["engine"], r["batch"]) for r in result["rows"]] == [
        ("eager", 1), ("eager", 8), ("onnxruntime", 1), ("onnxruntime", 8)]
    for r in result["rows"]:
        assert r["speedup"] == pytest.approx(r["dense_ms"] / r["pruned_ms"])
        assert r["fraction_of_limit"] == pytest.approx(r["limit_ms"] / r["pruned_ms"])
    assert result["flops"]["limit"] == pytest.approx(result["flops"]["pruned"], rel=0.15)


def test_operator_profile_finds_the_convolutions():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)).eval()
    profile = op_profile(model, (3, 16, 16), batch=4, runs=2, top=20)
    assert any("conv" in p["op"] for p in profile)
    assert 0 < sum(p["share"] for p in profile) <= 1 + 1e-9


def test_cli_bench_writes_its_report_and_refuses_bad_input(checkpoints, tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", str(checkpoints["l1"]), "--threads", "1", "--batch", "2", "--repeats", "1",
                 "--no-onnx", "--out", str(out)]) == 0
    data = json.loads((out / "bench.json").read_text())
    assert [r["engine"] for r in data["rows"]] == ["eager"] and (out / "bench.png").is_file()
    assert "fraction of limit" in (out / "bench.md").read_text()
    assert main(["bench", str(checkpoints["l1"]), "--batch", "0"]) == 2
    assert "--batch sizes and --repeats must be >= 1" in capsys.readouterr().err
    assert main(["export", str(checkpoints["l1"])]) == 2
    assert "give --onnx PATH and/or --pt2 PATH" in capsys.readouterr().err
