"""Inputs that used to be accepted and then did something else: each is now refused in one line, or does exactly
what it says."""

from __future__ import annotations

import argparse
import re

import pytest
import torch

import prunekit
from cli_lines import one_error_line
from prunekit.channels.graph import ChannelGraph, SliceKind
from prunekit.cli import _data_for, main
from prunekit.data import DataConfig
from prunekit.jobs import train_job
from prunekit.methods.admm import ADMMConfig, admm_prune_, constrained_layers
from prunekit.methods.channel import L1Config
from prunekit.methods.eigendamage import _find_layers
from prunekit.methods.registry import RunContext, prune_
from prunekit.models import create_model
from prunekit.planning.allocation import AllocationConfig, InfeasibleTargetError, Target
from prunekit.training import TrainConfig


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A trained LeNet-300-100, a channel-pruned copy and a LeNet-5 of the same data (another architecture)."""
    root = tmp_path_factory.mktemp("misuse")
    data, train = DataConfig("synthetic", limit=200), TrainConfig(epochs=1, batch_size=64)
    dense = train_job("lenet300", data, train, root / "dense", progress=False, log=lambda *_: None,
                      measure_latency=False).checkpoint
    other = train_job("lenet5", data, train, root / "other", progress=False, log=lambda *_: None,
                      measure_latency=False).checkpoint
    assert main(["prune", "l1", "--checkpoint", str(dense), "--target", "flops=0.5", "--out", str(root / "l1"),
                 "--no-progress", "--no-latency"]) == 0
    return {"dense": dense, "other": other, "pruned": root / "l1" / "flops-0.5" / "model.safetensors", "root": root}


def _resnet(synthetic):
    torch.manual_seed(0)
    return create_model("resnet20", num_classes=4, in_channels=1, input_size=12, width=0.5)


def test_ignoring_a_container_leaves_every_layer_inside_it_alone(synthetic):
    model = _resnet(synthetic)
    inside = {n for n, _ in model.named_modules() if n.startswith("layer1.")}
    graph = ChannelGraph(model, synthetic.train[:2][0], ignore=["layer1"])
    touched = {m.name for g in graph.groups for m in g.members if m.kind is SliceKind.OUT}
    assert touched and not touched & inside
    widths = {n: m.out_channels for n, m in model.named_modules() if n.startswith("layer1.") and hasattr(m,
                                                                                                       "out_channels")}
    prune_(model, L1Config(target="flops=0.6", ignore=("layer1",), reconstruction_images=0), synthetic,
           RunContext(log=lambda *_: None))
    modules = dict(model.named_modules())
    assert {n: modules[n].out_channels for n in widths} == widths
    assert not set(constrained_layers(model, ADMMConfig(ignore=("layer1",)), synthetic.train[:2][0])) & inside
    assert not set(_find_layers(model, synthetic.train[:2][0], ["layer1"])) & inside


def test_an_unknown_ignore_name_suggests_the_close_ones(synthetic):
    with pytest.raises(ValueError, match=r"ignore names \['layer4'\] are not modules.*Did you mean layer1"):
        ChannelGraph(_resnet(synthetic), synthetic.train[:2][0], ignore=["layer4"])


def test_round_to_wider_than_every_group_is_refused(runs, capsys):
    assert main(["prune", "l1", "--checkpoint", str(runs["dense"]), "--round-to", "100000", "--out",
                 str(runs["root"] / "round"), "--no-progress", "--no-latency"]) == 2
    line = one_error_line(capsys, "prune")
    assert "round_to=100000 is at least the width of every prunable group (the widest has 300)" in line


def test_a_group_no_wider_than_round_to_stays_whole(synthetic):
    torch.manual_seed(0)
    model = create_model("lenet5", num_classes=4, in_channels=1, input_size=12, width=0.25)  # conv1 has 5 channels
    result = prune_(model, L1Config(target="flops=0.7", reconstruction_images=0,
                                    allocation=AllocationConfig(round_to=8)), synthetic,
                    RunContext(log=lambda *_: None))
    assert result.kept_width["conv1"] == (5, 5)  # 5 < 8: no multiple of 8 to keep
    kept = [k for n, (k, d) in result.kept_width.items() if k != d]
    assert kept and all(k % 8 == 0 for k in kept)


@pytest.mark.parametrize("quant", ["bits=64", "bits=1", "ternary", "bits=x"])
def test_dpp_refuses_quantizations_it_cannot_train(runs, quant, capsys):
    assert main(["prune", "dpp", "--checkpoint", str(runs["dense"]), "--k", "1", "--n", "4",
                 "--quant", quant, "--epochs", "1", "--out", str(runs["root"] / "dpp"), "--no-progress",
                 "--no-latency"]) == 2
    assert "DPP quantization must be none, binary or bits=N with 2 <= N <= 16" in one_error_line(capsys, "prune")
    assert not (runs["root"] / "dpp").exists()


def test_admm_refuses_a_target_below_one_unit_per_layer(runs, capsys):
    assert main(["prune", "admm", "--checkpoint", str(runs["dense"]), "--target", "params=1e-9",
                 "--out", str(runs["root"] / "admm"), "--no-progress", "--no-latency"]) == 2
    line = one_error_line(capsys, "prune")
    assert "target params=1e-09 is infeasible for the unstructured pattern" in line and "give params=" in line


def test_admm_infeasible_filter_target_from_python(synthetic):
    torch.manual_seed(0)
    model = create_model("lenet300", num_classes=4, in_channels=1, input_size=12)
    expected = r"every one of the 3 constrained layers keeps at least one unit, which is 0\.00739"
    with pytest.raises(InfeasibleTargetError, match=expected):
        admm_prune_(model, synthetic, ADMMConfig(pattern="filter", target=Target("params", 1e-4)),
                    TrainConfig(epochs=1), progress=False, log=lambda *_: None)


def test_bench_refuses_a_dense_network_of_another_architecture(runs, capsys):
    assert main(["bench", str(runs["pruned"]), "--dense", str(runs["other"]), "--no-onnx", "--batch", "1"]) == 2
    line = one_error_line(capsys, "bench")
    assert f"{runs['pruned']} is not pruned from {runs['other']}" in line
    assert "built from lenet300 (width 1.0, 4 classes, 1x12x12), the other from lenet5" in line


def test_compare_refuses_a_variant_of_another_network(runs, capsys):
    assert main(["compare", str(runs["dense"]), "--variant", f"a={runs['other']}", "--min-run-time", "0.01"]) == 2
    assert f"variant a ({runs['other']}) is not pruned from {runs['dense']}" in one_error_line(capsys, "compare")


def test_compare_refuses_a_dense_model_that_is_itself_more_pruned(runs, capsys):
    assert main(["compare", str(runs["pruned"]), "--variant", f"a={runs['dense']}", "--min-run-time", "0.01"]) == 2
    assert "own architecture changes are not the first of" in one_error_line(capsys, "compare")


def test_compare_refuses_duplicate_variant_names(runs, capsys):
    argv = ["compare", str(runs["dense"]), "--variant", f"a={runs['pruned']}", "--variant", f"a={runs['dense']}"]
    assert main(argv) == 2
    assert "--variant name 'a' is given twice" in one_error_line(capsys, "compare")


@pytest.mark.parametrize("seconds", ["nan", "inf", "0", "-1"])
def test_compare_refuses_latency_times_that_never_end(runs, seconds, capsys):
    argv = ["compare", str(runs["dense"]), "--variant", f"a={runs['pruned']}", "--min-run-time", seconds]
    assert main(argv) == 2
    assert "min_run_time (--min-run-time) must be seconds in (0, 600]" in one_error_line(capsys, "compare")


def test_iterations_are_bounded(runs, capsys):
    assert main(["prune", "l1", "--checkpoint", str(runs["dense"]), "--iterations", "1000000000", "--out",
                 str(runs["root"] / "it"), "--no-progress", "--no-latency"]) == 2
    assert "iterations must be an int >= 1 and at most 100" in one_error_line(capsys, "prune")


def test_eval_val_fraction_is_validated_and_used(runs, capsys):
    assert main(["eval", str(runs["dense"]), "--val-fraction", "2"]) == 2
    assert "val_fraction must be in (0, 1), got 2.0" in one_error_line(capsys, "eval")
    args = argparse.Namespace(data=None, data_dir=None, val_fraction=0.3, limit=None)
    assert _data_for(args, str(runs["dense"])) == DataConfig("synthetic", limit=200, val_fraction=0.3)
    args.val_fraction = None  # not given: the checkpoint's own split
    assert _data_for(args, str(runs["dense"])) == DataConfig("synthetic", limit=200)
    args.data = "digits"  # another dataset starts from its defaults
    assert _data_for(args, str(runs["dense"])) == DataConfig("digits")


def test_data_flags_without_a_dataset_to_apply_them_to(capsys):
    assert main(["prune", "l1", "--model", "lenet300", "--limit", "100", "--out", "x", "--no-progress"]) == 2
    assert "--limit need --data" in one_error_line(capsys, "prune")


def test_train_refuses_an_infinite_width(tmp_path, capsys):
    assert main(["train", "--model", "lenet300", "--data", "synthetic", "--width", "inf", "--epochs", "1",
                 "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    assert "width must be a positive number, got inf" in one_error_line(capsys, "train")


def test_sparse_labels_warn_in_one_line(tmp_path, capsys):
    import numpy as np

    from prunekit.data import write_idx

    rng = np.random.default_rng(0)
    for stem, n in (("train", 60), ("t10k", 20)):
        write_idx(tmp_path / f"{stem}-images-idx3-ubyte", rng.integers(0, 256, (n, 8, 8), dtype=np.uint8))
        labels = (np.arange(n) % 3).astype(np.uint8)
        labels[0] = 255
        write_idx(tmp_path / f"{stem}-labels-idx1-ubyte", labels)
    assert main(["train", "--model", "lenet300", "--data", "mnist", "--data-dir", str(tmp_path), "--epochs", "1",
                 "--out", str(tmp_path / "run"), "--no-progress", "--device", "cpu"]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warned == [warned[0]] and warned[0].startswith("prunekit train: warning: mnist: the labels use 4 of the "
                                                          "class ids 0..255")


def test_target_rejects_nan():
    with pytest.raises(ValueError):
        Target.parse("flops=nan")


# ------------------------------------------------------------------- settings a method would accept and then ignore


@pytest.mark.parametrize("build, message", [
    (lambda: ADMMConfig(pattern="unstructured", k=2, n=4), "k and n belong to the k-of-n pattern"),
    (lambda: ADMMConfig(pattern="group", target="flops=0.5", allocation="uniform"), "does not use them"),
    (lambda: ADMMConfig(pattern="group", target="flops=0.5", rates={"fc1": 0.5}), "does not use them"),
    (lambda: ADMMConfig(pattern="k-of-n", k=1, n=4, rates={"fc1": 0.5}), "k of n everywhere"),
    (lambda: ADMMConfig(quant_steps=(0.5, 1.0)), "give them with quant"),
    (lambda: ADMMConfig(pattern="unstructured", target="channels=0.5"), "channels=... needs the group pattern"),
    (lambda: prunekit.DPPConfig(pattern="kernel", k=2, n=3), "n is for k-of-n"),
    (lambda: prunekit.DPPConfig(target="params=0.25", k=1), "not both"),
], ids=["admm-kn-unstructured", "admm-group-allocation", "admm-group-rates", "admm-kofn-rates",
        "admm-steps-no-quant", "admm-channels", "dpp-kernel-n", "dpp-target-and-k"])
def test_settings_that_would_be_ignored_are_refused(build, message):
    with pytest.raises(ValueError, match=message):
        build()


@pytest.mark.parametrize("method, flags", [("admm", ["--pattern", "eigen-direction"]),
                                           ("dpp", ["--pattern", "unstructured"])])
def test_pattern_choices_are_the_methods_own(method, flags, capsys):
    assert main(["prune", method, "--model", "lenet5", "--out", "x", *flags]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_admm_and_dpp_take_flops_targets(synthetic):
    """A FLOPs target weighs each weight by its layer's FLOPs: LeNet-5's convolutions cost most per weight, so a
    FLOPs budget keeps fewer of their weights than a parameters budget of the same fraction does."""
    from prunekit.measurement.metrics import count_flops

    def kept_conv_weights(config):
        torch.manual_seed(0)
        model = create_model("lenet5", num_classes=4, in_channels=1, input_size=12, width=0.5)
        dense_flops = count_flops(model, (1, 1, 12, 12))
        prunekit.prune_(model, config, synthetic, prunekit.RunContext(train=TrainConfig(epochs=0, lr=0.01),
                                                                      log=lambda *_: None, progress=False))
        conv = int((model.conv2.weight != 0).sum())
        return conv, dense_flops

    by_params, _ = kept_conv_weights(ADMMConfig(target="params=0.2", admm_epochs=0, retrain_epochs=0))
    by_flops, _ = kept_conv_weights(ADMMConfig(target="flops=0.2", admm_epochs=0, retrain_epochs=0))
    assert by_flops < by_params
    from prunekit.planning.allocation import plan_k_of_n

    shapes = {"a": (10, 100), "b": (10, 100)}
    assert plan_k_of_n(shapes, 0.5, costs={"a": 4.0, "b": 4.0}) == plan_k_of_n(shapes, 0.5)  # uniform cost: same
    cheap_a = plan_k_of_n({"a": (10, 200), "b": (10, 200)}, 0.5, costs={"a": 1.0, "b": 1.0})
    assert cheap_a == {"a": (1, 2), "b": (1, 2)}


def test_the_random_criterion_follows_the_seed(synthetic):
    def plan(seed):
        torch.manual_seed(0)
        model = create_model("lenet300", num_classes=4, in_channels=1, input_size=12)
        record = prunekit.prune_(model, prunekit.RandomConfig(target="flops=0.5", reconstruction_images=0),
                                 synthetic, prunekit.RunContext(seed=seed, log=lambda *_: None))
        return record.changes

    assert plan(0) == plan(0) and plan(0) != plan(1)


def test_prune_into_a_folder_with_another_runs_work_is_refused(synthetic, tmp_path):
    torch.manual_seed(0)
    base = prunekit.ModelConfig("lenet300", num_classes=4, in_channels=1, input_size=12).to_dict()

    def run(target, resume=False):
        model = create_model("lenet300", num_classes=4, in_channels=1, input_size=12)
        ctx = prunekit.RunContext(folder=tmp_path, base=base, resume=resume, log=lambda *_: None)
        return prunekit.prune_(model, ADMMConfig(target=target, admm_epochs=1, retrain_epochs=0), synthetic, ctx)

    run("params=0.2")
    with pytest.raises(prunekit.CheckpointError, match="already holds a run"):
        run("params=0.5")  # its phases would have been reused
    with pytest.raises(prunekit.CheckpointError, match="other method settings"):
        run("params=0.5", resume=True)


def test_a_failed_fresh_job_leaves_its_folder_usable(runs, capsys):
    """The kernel pattern fits no layer of a LeNet-300 (it has no convolution), which only the method finds out;
    the job that failed leaves nothing behind, so the corrected command may use the same --out."""
    out = runs["root"] / "dpp-fail"
    assert main(["prune", "dpp", "--checkpoint", str(runs["dense"]), "--pattern", "kernel", "--epochs", "1",
                 "--out", str(out), "--no-progress", "--no-latency"]) == 2
    assert "DPP found no Linear/Conv2d layer" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())
    assert main(["prune", "dpp", "--checkpoint", str(runs["dense"]), "--epochs", "1", "--out", str(out),
                 "--no-progress", "--no-latency"]) == 0


def test_resume_with_nothing_to_resume_is_refused(runs, capsys):
    assert main(["prune", "l1", "--checkpoint", str(runs["dense"]), "--out", str(runs["root"] / "empty"),
                 "--resume", "--no-progress", "--no-latency"]) == 2
    assert "nothing to resume in" in capsys.readouterr().err


def test_prune_never_writes_into_a_training_run(runs, capsys):
    out = runs["dense"].parent
    assert main(["prune", "l1", "--checkpoint", str(runs["dense"]), "--out", str(out), "--no-progress",
                 "--no-latency"]) == 2
    err = capsys.readouterr().err
    assert "already holds a pruning run" in err and "(found model.safetensors)" in err


def test_export_takes_only_its_formats(runs, tmp_path, capsys):
    run = runs["pruned"]
    assert main(["export", str(run), "--onnx", str(tmp_path / "m.json")]) == 2
    assert "must end in .onnx" in capsys.readouterr().err
    assert main(["export", str(run), "--onnx", str(tmp_path / "m.onnx"), "--opset", "3"]) == 2
    assert "--opset must be 18 to 23" in capsys.readouterr().err
    assert main(["export", str(run), "--pt2", str(tmp_path / "m.onnx")]) == 2
    assert "must end in .pt2" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_bench_refuses_impossible_threads_and_other_networks(runs, tmp_path, capsys):
    assert main(["bench", str(runs["pruned"]), "--threads", "100000", "--no-onnx"]) == 2
    assert "--threads must be 1 to" in capsys.readouterr().err
    # a dense network of the same architecture, but not the one this run was pruned from
    other = train_job("lenet300", DataConfig("synthetic", limit=200), TrainConfig(epochs=1, batch_size=64, seed=9),
                      tmp_path / "other", progress=False, log=lambda *_: None, measure_latency=False).checkpoint
    assert main(["bench", str(runs["pruned"]), "--dense", str(other), "--no-onnx", "--batch", "1"]) == 2
    assert "was pruned from another network of the same architecture" in capsys.readouterr().err


def test_bench_and_compare_keep_existing_reports_without_overwrite(runs, tmp_path, capsys):
    (tmp_path / "bench.md").write_text("mine")
    assert main(["bench", str(runs["pruned"]), "--no-onnx", "--batch", "1", "--repeats", "1", "--out",
                 str(tmp_path)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "bench.md").read_text() == "mine"


@pytest.mark.parametrize("build, message", [
    (lambda: prunekit.DPPConfig(tiles=5, n=5), "give tiles or n, not both"),
    (lambda: prunekit.DPPConfig(k=3), "give n (or tiles) with k=3"),
    (lambda: prunekit.DPPConfig(temperature={"start": 1.0, "end": 0.05, "floor": 5.0}), "lower --temperature-floor"),
    (lambda: ADMMConfig(quant="bits=4", quant_steps=(0.5, 0.5, 1.0)), "quant_steps must rise"),
    (lambda: prunekit.FisherSettings(damping=0), "damping must be a finite number > 0"),
    (lambda: ADMMConfig(rho=1e300), "rho must be > 0 and at most 1e4"),
], ids=["dpp-tiles-n", "dpp-k-without-n", "dpp-floor", "admm-steps-flat", "damping-zero", "admm-rho-huge"])
def test_settings_that_cannot_work_are_refused(build, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build()


def test_sixteen_bit_codes_are_on_their_grid():
    """float32 multiples k * q drift from integer k as k grows: 16-bit codes reach 32768."""
    from prunekit.measurement.formats import infer_scale, value_codec

    q = 0.00123
    w = (torch.tensor([1, -7, 32767, 20000, -12345], dtype=torch.float64) * q).float()
    assert value_codec(w, 16, q).bits == 16
    assert infer_scale(w, 16) == pytest.approx(q, rel=1e-6)
