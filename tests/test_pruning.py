"""Pruning jobs end to end: targets reached on the measured model, BatchNorm re-estimation against an explicit
computation, iterative rounds that resume exactly, pickle-free save/load in a fresh process, user factories."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from prunekit.cli import main
from prunekit.measurement.metrics import count_flops, count_params
from prunekit.methods.channel import BNConfig, L1Config
from prunekit.methods.registry import RunContext, get_method, prune_
from prunekit.models import ModelConfig, create_model
from prunekit.persistence.architecture import UntrustedCodeError, load_compressed, load_factory
from prunekit.persistence.checkpoint import CheckpointError, save_checkpoint
from prunekit.planning.allocation import InfeasibleTargetError
from prunekit.planning.schedule import RoundSchedule
from prunekit.recovery.batchnorm import recalibrate_batchnorm_
from prunekit.runner import prune_job
from prunekit.training import TrainConfig


def small_resnet(data, seed: int = 0) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(seed)
    config = ModelConfig("resnet20", num_classes=data.num_classes, in_channels=data.in_channels,
                         input_size=data.input_size, width=0.5)
    return create_model(config), config.to_dict()


@pytest.fixture
def dense_checkpoint(tmp_path, synthetic):
    """A briefly trained ResNet-20 (width 0.5) on synthetic data, saved as a prunekit checkpoint."""
    from prunekit.training import fit

    model, base = small_resnet(synthetic)
    fit(model, synthetic, TrainConfig(epochs=1, lr=0.05), progress=False)
    return save_checkpoint(tmp_path / "dense.safetensors", model,
                           {"model": base, "data": synthetic.config.to_dict()})


@pytest.mark.parametrize("target", ["flops=0.25", "params=0.5"])
@pytest.mark.parametrize("method", ["l1", "taylor"])
def test_one_shot_reaches_target_on_the_measured_model(synthetic, target, method):
    model, base = small_resnet(synthetic)
    shape = (1, synthetic.in_channels, synthetic.input_size, synthetic.input_size)
    flops0, params0 = count_flops(model, shape), count_params(model)
    config = get_method(method).config(target=target)
    prune_(model, config, synthetic, RunContext(base=base, log=lambda *_: None))  # in place
    metric, keep = target.split("=")
    kept = count_flops(model, shape) / flops0 if metric == "flops" else count_params(model) / params0
    assert abs(kept / float(keep) - 1) <= 0.02
    assert model(torch.zeros(shape)).shape == (1, synthetic.num_classes)


def test_recalibrated_batchnorm_holds_exact_input_statistics(synthetic):
    model, _ = small_resnet(synthetic)
    model.eval()
    bn = model.layer2[0].bn1
    inputs = []
    handle = bn.register_forward_hook(lambda m, inp, out: inputs.append(inp[0].detach()))
    recalibrate_batchnorm_(model, synthetic, images=200, batch_size=64)
    handle.remove()
    x = torch.cat(inputs)  # the BN inputs over the same 200 images (computed with the statistics being updated
    # only at BN outputs, which do not feed back into this layer's own inputs within a forward pass)
    assert x.shape[0] == 200
    torch.testing.assert_close(bn.running_mean, x.mean(dim=(0, 2, 3)), atol=1e-5, rtol=1e-4)
    n = x.numel() / x.shape[1]
    unbiased = x.var(dim=(0, 2, 3), unbiased=False) * n / (n - 1)
    # BN's cumulative average is over per-batch unbiased variances, not the pooled variance: compare loosely
    torch.testing.assert_close(bn.running_var, unbiased, atol=0.05, rtol=0.05)
    assert not model.training and bn.momentum == 0.1


def test_recalibration_restores_accuracy_after_pruning(synthetic, dense_checkpoint):
    model, _ = load_compressed(dense_checkpoint)
    base = {"name": "resnet20"}
    without = prune_(model, L1Config(target="flops=0.3", bn_images=0, reconstruction_images=0), synthetic,
                     RunContext(base=base, log=lambda *_: None))
    model, _ = load_compressed(dense_checkpoint)
    with_bn = prune_(model, L1Config(target="flops=0.3", reconstruction_images=0), synthetic,
                     RunContext(base=base, log=lambda *_: None))
    assert with_bn.val_acc_before_finetune >= without.val_acc_before_finetune
    assert 0 <= with_bn.test_acc_before_finetune <= 1


def test_iterative_rounds_are_saved_and_resume_exactly(tmp_path, synthetic):
    config = L1Config(target="flops=0.3", schedule=RoundSchedule(iterations=2), finetune_epochs=1)
    train = TrainConfig(epochs=0, lr=0.02)  # fine-tuning settings; its epochs come from config.finetune_epochs

    def context(folder, **kwargs):
        return RunContext(train=train, folder=folder, base=base, progress=False, **kwargs)

    full_model, base = small_resnet(synthetic)
    full = prune_(full_model, config, synthetic, context(tmp_path / "full", log=lambda *_: None))
    assert [r["round"] for r in full.rounds] == [1, 2]
    assert (tmp_path / "full" / "round_1" / "pruned.safetensors").is_file()
    # interrupted after round 1: round 2's folder is lost
    model, base = small_resnet(synthetic)
    prune_(model, L1Config(target="flops=0.3", schedule=RoundSchedule(iterations=2), finetune_epochs=1), synthetic,
           context(tmp_path / "cut", log=lambda *_: None))
    import shutil

    shutil.rmtree(tmp_path / "cut" / "round_2")
    resumed_model, base = small_resnet(synthetic)
    logs: list[str] = []
    resumed = prune_(resumed_model, config, synthetic, context(tmp_path / "cut", resume=True, log=logs.append))
    assert any("resuming after round 1" in line for line in logs)
    a, b = full_model.state_dict(), resumed_model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert len(resumed.changes) == 2


def test_resume_with_other_settings_is_refused(tmp_path, synthetic):
    model, base = small_resnet(synthetic)
    prune_(model, L1Config(target="flops=0.5"), synthetic, RunContext(folder=tmp_path, base=base,
                                                                     log=lambda *_: None))
    model, base = small_resnet(synthetic)
    with pytest.raises(CheckpointError, match="cannot resume"):
        prune_(model, L1Config(target="flops=0.4"), synthetic, RunContext(folder=tmp_path, base=base, resume=True,
                                                                          log=lambda *_: None))


def test_saved_pruned_model_loads_in_a_new_process_with_identical_outputs(tmp_path, synthetic):
    model, base = small_resnet(synthetic)
    prune_(model, L1Config(target="flops=0.4"), synthetic, RunContext(folder=tmp_path, base=base,
                                                                     log=lambda *_: None))
    path = tmp_path / "round_1" / "pruned.safetensors"
    x = torch.randn(3, synthetic.in_channels, synthetic.input_size, synthetic.input_size)
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        expected = model.eval()(x)
    script = textwrap.dedent(f"""
        import torch
        from prunekit.persistence.architecture import load_compressed
        model, _ = load_compressed({str(path)!r})
        x = torch.load({str(tmp_path / 'x.pt')!r}, weights_only=True)
        with torch.no_grad():
            torch.save(model(x), {str(tmp_path / 'y.pt')!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    got = torch.load(tmp_path / "y.pt", weights_only=True)
    assert torch.equal(got, expected)


def test_saved_pruned_model_is_not_a_pickle(tmp_path, synthetic):
    model, base = small_resnet(synthetic)
    prune_(model, L1Config(target="flops=0.5"), synthetic, RunContext(folder=tmp_path, base=base,
                                                                     log=lambda *_: None))
    checkpoint = tmp_path / "round_1" / "pruned.safetensors"
    head = checkpoint.read_bytes()[:8]
    header_len = int.from_bytes(head, "little")
    header = json.loads(checkpoint.read_bytes()[8:8 + header_len])
    changes = json.loads(header["__metadata__"]["prunekit"])["architecture_changes"]
    assert changes[0]["kind"] == "channels" and changes[0]["removed"]


def test_prune_config_round_trip_and_validation():
    config = BNConfig(target="params=0.5", schedule=RoundSchedule(iterations=3), ignore=("fc",))
    assert BNConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        get_method("nope")
    with pytest.raises(ValueError, match="iterations must be an int >= 1"):
        L1Config(schedule={"iterations": 0})
    with pytest.raises(ValueError, match="target must look like"):
        L1Config(target="quarter")
    with pytest.raises(ValueError, match="unknown L1Config fields"):
        L1Config.from_dict({"methd": "l1"})


def test_infeasible_target_is_a_clear_error(synthetic):
    model, base = small_resnet(synthetic)
    from prunekit.planning.allocation import AllocationConfig

    with pytest.raises(InfeasibleTargetError, match="max_per_layer=0.3"):
        prune_(model, L1Config(target="flops=0.05", allocation=AllocationConfig("global", 0.3)), synthetic,
               RunContext(base=base, log=lambda *_: None))


def test_user_factory_model_from_a_state_dict(tmp_path, synthetic, monkeypatch):
    package = tmp_path / "usernet"
    package.mkdir()
    (package / "__init__.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        def build():
            return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                 nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(8, 4))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.manual_seed(0)
    net = load_factory("usernet:build")()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "user.safetensors"))
    torch.save(net.state_dict(), tmp_path / "user.pt")
    for ckpt in ("user.safetensors", "user.pt"):
        outcome = prune_job(L1Config(target="params=0.6"), model="usernet:build", data=synthetic.config,
                            checkpoint=tmp_path / ckpt, out=tmp_path / f"out-{ckpt}", measure_latency=False,
                            log=lambda *_: None)
        path = tmp_path / f"out-{ckpt}" / "params-0.6" / "model.safetensors"
        with pytest.raises(UntrustedCodeError, match="pass --trust-factory usernet:build"):
            load_compressed(path)  # a file naming a factory is refused unless the caller trusts that factory
        model, meta = load_compressed(path, trusted_factories=["usernet:build"])
        assert meta["model"]["factory"] == "usernet:build"
        assert outcome.rows["params-0.6"]["params"] == sum(p.numel() for p in model.parameters())


def test_factory_spec_errors():
    with pytest.raises(ValueError, match="package.module:function"):
        load_factory("nocolon")
    with pytest.raises(ValueError, match="cannot import"):
        load_factory("no_such_pkg_xyz:build")
    with pytest.raises(ValueError, match="no callable"):
        load_factory("prunekit:nothing_here")


def _only_run(report: dict) -> tuple[str, dict]:
    """The label and entry of the one run in a prunekit.report/2 report."""
    (label, run), = report["runs"].items()
    return label, run


def test_cli_prune_then_eval_inspect_export(tmp_path, dense_checkpoint, capsys):
    out = tmp_path / "run"
    code = main(["prune", "l2", "--checkpoint", str(dense_checkpoint), "--target", "flops=0.5",
                 "--target", "flops=0.3", "--finetune-epochs", "1", "--out", str(out), "--no-progress",
                 "--no-latency"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    pruned_row = report["runs"]["flops-0.3"]["compressed"]  # the last target (the old top-level "pruned" row)
    for key in ("params", "flops", "latency_ms_b1", "latency_ms_b64", "val_acc", "test_acc"):
        assert key in report["dense"] and key in pruned_row
    assert pruned_row["flops"] < report["dense"]["flops"]
    assert (out / "accuracy_vs_flops.png").is_file() and (out / "flops-0.3" / "kept_width.png").is_file()
    assert "| dense |" in (out / "report.md").read_text()
    pruned = out / "flops-0.3" / "model.safetensors"
    assert main(["eval", str(pruned)]) == 0
    assert main(["inspect", str(pruned)]) == 0
    pytest.importorskip("onnxruntime")
    assert main(["export", str(pruned), "--onnx", str(tmp_path / "m.onnx")]) == 0
    assert "ONNX Runtime matches PyTorch" in capsys.readouterr().out


@pytest.mark.parametrize("method, extra", [
    ("eigendamage", ["--form", "depthwise"]),
    ("kron-obs", ["--obs-update", "joint", "--fisher", "empirical"]),
])
def test_cli_curvature_methods_prune_eval_and_export(tmp_path, dense_checkpoint, capsys, method, extra):
    out = tmp_path / "run"
    code = main(["prune", method, "--checkpoint", str(dense_checkpoint), "--target", "flops=0.4",
                 "--fisher-batches", "2", "--damping", "0.01", "--finetune-epochs", "1", "--out", str(out),
                 "--no-progress", "--no-latency", *extra])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    run = report["runs"]["flops-0.4"]
    assert run["compressed"]["flops"] / report["dense"]["flops"] <= 0.4 * 1.02
    assert run["config"]["curvature"]["fisher"] == ("empirical" if "empirical" in extra else "true")
    pruned = out / "flops-0.4" / "model.safetensors"
    assert main(["eval", str(pruned)]) == 0
    pytest.importorskip("onnxruntime")
    assert main(["export", str(pruned), "--onnx", str(tmp_path / "m.onnx")]) == 0
    assert "ONNX Runtime matches PyTorch" in capsys.readouterr().out


def test_cli_admm_reports_exact_storage_and_saves_a_loadable_model(tmp_path, dense_checkpoint, capsys):
    out = tmp_path / "admm"
    code = main(["prune", "admm", "--checkpoint", str(dense_checkpoint), "--target", "params=x10",
                 "--quant", "bits=3", "--admm-epochs", "1", "--retrain-epochs", "1", "--rho", "0.05",
                 "--out", str(out), "--no-progress", "--no-latency"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    label, run = _only_run(report)
    storage = run["storage"]
    assert storage["format"] in storage["bits_by_format"] and storage["values"] == "3-bit codes"
    assert storage["compression"]["csr"] > 10  # 10x fewer weights, 3-bit codes, indices paid for
    assert run["compressed"]["nonzero_params"] < report["dense"]["params"] / 5
    assert "- storage: " in (out / "report.md").read_text()
    model, meta = load_compressed(out / label / "model.safetensors")
    assert meta["config"]["quant"] == "bits=3" and set(meta["encoding"]["scales"]) == set(run["results"]["rates"])


def _prune_cli(tmp_path, dense_checkpoint, capsys, name: str, method: str, *argv: str) -> tuple:
    """Run ``prunekit prune METHOD`` on the dense checkpoint (no progress, no latency); returns (out dir, report)."""
    out = tmp_path / name
    code = main(["prune", method, "--checkpoint", str(dense_checkpoint), *argv, "--out", str(out), "--no-progress",
                 "--no-latency"])
    assert code == 0, capsys.readouterr().err
    return out, json.loads((out / "report.json").read_text())


def _removed_channels(meta: dict) -> int:
    """Channels a saved model's architecture changes removed."""
    return sum(len(v) for change in meta["architecture_changes"] for v in change.get("removed", {}).values())


def test_cli_admm_channel_pattern_shrinks_the_model_and_it_reloads(tmp_path, dense_checkpoint, capsys):
    out, report = _prune_cli(tmp_path, dense_checkpoint, capsys, "admm-channel", "admm", "--pattern",
                             "channel", "--target", "params=0.5", "--admm-epochs", "1", "--retrain-epochs", "1",
                             "--rho", "0.05")
    label, run = _only_run(report)
    model, meta = load_compressed(out / label / "model.safetensors")
    assert _removed_channels(meta) > 0 and run["compressed"]["flops"] < report["dense"]["flops"]
    assert sum(p.numel() for p in model.parameters()) == run["compressed"]["params"]


def test_cli_admm_group_pattern_meets_a_flops_target_and_reports_storage_against_the_dense_model(
        tmp_path, dense_checkpoint, capsys):
    out, report = _prune_cli(tmp_path, dense_checkpoint, capsys, "admm-group", "admm", "--pattern",
                             "group", "--target", "flops=0.5", "--admm-epochs", "1", "--retrain-epochs", "1",
                             "--rho", "0.05")
    label, run = _only_run(report)
    assert 0.45 < run["compressed"]["flops"] / report["dense"]["flops"] <= 0.52
    assert run["storage"]["dense_bits"] == 32 * report["dense"]["params"]
    assert run["storage"]["compression"]["dense"] > 1.5
    model, _ = load_compressed(out / label / "model.safetensors")
    assert sum(p.numel() for p in model.parameters()) == run["compressed"]["params"]


def test_cli_dpp_learns_k_of_n_masks_and_reports_storage_and_metrics(tmp_path, dense_checkpoint, capsys):
    out = tmp_path / "dpp"
    code = main(["prune", "dpp", "--checkpoint", str(dense_checkpoint), "--pattern", "kernel",
                 "--k", "1", "--epochs", "1", "--quant", "bits=8", "--out", str(out), "--no-progress",
                 "--no-latency", "--init-scale", "10", "--anneal-noise", "--logit-lr-scale", "20"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    label, run = _only_run(report)
    assert run["compressed"]["nonzero_params"] < report["dense"]["params"]
    assert (out / label / "mask_metrics.png").read_bytes()[:4] == b"\x89PNG"
    assert run["results"]["metrics"] and "final mask confidence / diversity" in (out / "report.md").read_text()
    model, meta = load_compressed(out / label / "model.safetensors")
    assert meta["config"]["pattern"] == "kernel"
    assert (meta["config"]["init_scale"], meta["config"]["anneal_noise"], meta["config"]["logit_lr_scale"]) == \
        (10, True, 20)


def test_cli_dpp_params_target_plans_k_of_n_per_layer_and_keeps_about_that_fraction(
        tmp_path, dense_checkpoint, capsys):
    out, report = _prune_cli(tmp_path, dense_checkpoint, capsys, "dpp-plan", "dpp", "--target",
                             "params=0.25", "--epochs", "1", "--anneal-noise")
    label, run = _only_run(report)
    model, _ = load_compressed(out / label / "model.safetensors")
    weights = [m.weight for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    kept = sum(int((w != 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert 0.18 < kept <= 0.25  # the plan never keeps more than asked; small layers dense count in
    assert "k-of-n" in run["storage"]["bits_by_format"]
    assert "k of n per layer" in (out / "report.md").read_text()


def test_cli_dpp_group_pattern_shrinks_the_model_and_it_reloads(tmp_path, dense_checkpoint, capsys):
    out, report = _prune_cli(tmp_path, dense_checkpoint, capsys, "dpp-filter", "dpp", "--pattern",
                             "group", "--target", "flops=0.5", "--epochs", "1")
    label, run = _only_run(report)
    assert 0.45 < run["compressed"]["flops"] / report["dense"]["flops"] <= 0.52
    assert "removed physically" in (out / "report.md").read_text()
    model, _ = load_compressed(out / label / "model.safetensors")
    assert sum(p.numel() for p in model.parameters()) == run["compressed"]["params"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["dpp", "--pattern", "group", "--epochs", "1"], "the DPP group pattern needs a target"),
        (["dpp", "--k", "0"], "k must be an int >= 1"),
        (["dpp", "--target", "params=0.25", "--k", "1", "--epochs", "1"], "not both"),
        (["dpp", "--target", "channels=0.25", "--epochs", "1"], "must be params=FRACTION"),
        (["dpp", "--k", "5", "--n", "4", "--epochs", "1"], "k must be smaller than n"),
        (["dpp", "--k", "1", "--n", "4", "--temperature-start", "0", "--temperature-end", "0.1", "--epochs", "1"],
         "temperature start must be > 0"),
        (["dpp", "--k", "1", "--n", "4", "--logit-lr-scale", "0", "--epochs", "1"],
         "logit_lr_scale must be > 0"),
        (["admm", "--target", "channels=0.5"], "needs the group pattern"),
        (["admm", "--pattern", "k-of-n", "--k", "5", "--n", "4"], "k < n"),
        (["admm", "--quant", "bits=0"], "bits must be an int >= 1"),
        (["nope"], "unknown method 'nope'"),
        (["eigendamage", "--target", "channels=0.5"], "not channels"),
        (["kron-obs", "--damping", "-1"], "damping must be a finite number"),
        (["l1", "--target", "flops"], "target must look like"),
        (["l1", "--target", "flops=1.5"], "keep fraction must be in"),
        (["l1", "--target", "flops=0.01", "--max-per-layer", "0.2"], "infeasible"),
        (["l1", "--model", "vgg11"], "does not match the checkpoint"),
        (["l1", "--ignore", "nosuchlayer"], "not modules of the model"),
    ],
)
def test_cli_prune_bad_input_is_one_line(tmp_path, dense_checkpoint, capsys, argv, message):
    method, *flags = argv
    code = main(["prune", method, "--checkpoint", str(dense_checkpoint), "--out", str(tmp_path / "o"),
                 "--no-latency", "--no-progress", *flags])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1


def test_cli_prune_missing_checkpoint(tmp_path, capsys):
    code = main(["prune", "l1", "--checkpoint", str(tmp_path / "none.safetensors"), "--out", str(tmp_path / "o")])
    assert code == 2 and "does not exist" in capsys.readouterr().err
