"""A checkpoint is data: no command imports or calls code that a file names unless the user trusts that exact
factory in that command, and metadata or training state of the wrong shape gives one line naming the field,
never a traceback.

The import checks use a real module on ``sys.path`` that records its own import in a file, so any import (not only
a call of the factory) would be seen.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cli_lines import one_error_line
from prunekit.channels.graph import ChannelGraph, ChannelPlan
from prunekit.cli import main
from prunekit.models import ModelConfig, create_model
from prunekit.persistence.architecture import UntrustedCodeError, load_compressed, save_compressed
from prunekit.persistence.checkpoint import CheckpointError, read_metadata
from prunekit.persistence.metadata import MetadataError

MODEL = ModelConfig(name="lenet300", num_classes=4, in_channels=1, input_size=12)
FACTORY_SOURCE = """
    from pathlib import Path

    Path({marker!r}).write_text("imported")  # recorded the moment the module is imported

    from torch import nn


    def build():
        Path({marker!r}).write_text("called")
        return nn.Sequential(nn.Flatten(), nn.Linear(144, 16), nn.ReLU(), nn.Linear(16, 4))
"""


def _factory_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(144, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))




@pytest.fixture
def planted(tmp_path, monkeypatch, synthetic):
    """A module ``plantedfactory`` importable from ``sys.path`` that records its import, and a checkpoint naming
    its factory, plus a dense zoo checkpoint for the commands that take two files."""
    marker = tmp_path / "marker.txt"
    (tmp_path / "plantedfactory.py").write_text(textwrap.dedent(FACTORY_SOURCE.format(marker=str(marker))))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("plantedfactory", None)
    base = {"factory": "plantedfactory:build", "input_shape": [1, 12, 12]}
    path = save_compressed(tmp_path / "planted.safetensors", _factory_model(), base, [],
                           {"data": synthetic.config.to_dict()})
    torch.manual_seed(0)
    zoo = save_compressed(tmp_path / "zoo.safetensors", create_model(MODEL), MODEL.to_dict(), [],
                          {"data": synthetic.config.to_dict()})
    yield {"marker": marker, "path": path, "zoo": zoo, "dir": tmp_path}
    sys.modules.pop("plantedfactory", None)


def _loading_commands(path: Path, zoo: Path, out: Path) -> dict[str, list[str]]:
    return {
        "eval": ["eval", str(path)],
        "inspect": ["inspect", str(path)],
        "export": ["export", str(path), "--onnx", str(out / "m.onnx")],
        "bench": ["bench", str(path), "--no-onnx", "--batch", "1", "--repeats", "1"],
        "compare-dense": ["compare", str(path), "--variant", f"a={zoo}", "--min-run-time", "0.01"],
        "compare-variant": ["compare", str(zoo), "--variant", f"a={path}", "--min-run-time", "0.01"],
        "bench-dense": ["bench", str(zoo), "--dense", str(path), "--no-onnx", "--batch", "1", "--repeats", "1"],
        "prune": ["prune", "l1", "--checkpoint", str(path), "--target", "params=0.5", "--out",
                  str(out / "pruned"), "--no-progress", "--no-latency"],
    }


@pytest.mark.parametrize("case", ["eval", "inspect", "export", "bench", "compare-dense", "compare-variant",
                                  "bench-dense", "prune"])
def test_a_checkpoint_naming_a_factory_imports_nothing(planted, case, capsys):
    argv = _loading_commands(planted["path"], planted["zoo"], planted["dir"])[case]
    assert main(argv) == 2
    line = one_error_line(capsys, argv[0])
    assert "asks to import 'plantedfactory' and call 'build'" in line
    assert "pass --trust-factory plantedfactory:build" in line
    assert not planted["marker"].exists(), "the module named by the file was imported"
    assert "plantedfactory" not in sys.modules
    assert not (planted["dir"] / "m.onnx").exists() and not (planted["dir"] / "pruned").exists()


def test_the_python_loader_imports_nothing_either(planted):
    with pytest.raises(UntrustedCodeError, match="trusted_factories=\\['plantedfactory:build'\\]"):
        load_compressed(planted["path"])
    with pytest.raises(UntrustedCodeError):
        load_compressed(planted["path"], trusted_factories=["plantedfactory:other"])  # trust is per factory
    assert not planted["marker"].exists() and "plantedfactory" not in sys.modules


def test_trusting_the_factory_in_the_command_allows_it(planted, capsys):
    assert main(["eval", str(planted["path"]), "--trust-factory", "plantedfactory:build"]) == 0
    assert capsys.readouterr().out.startswith("test accuracy ")
    assert planted["marker"].read_text() == "called"


def test_prune_model_flag_naming_the_same_factory_is_consent(planted, capsys):
    out = planted["dir"] / "pruned"
    argv = ["prune", "l1", "--model", "plantedfactory:build", "--checkpoint", str(planted["path"]), "--target",
            "params=0.5", "--out", str(out), "--no-progress", "--no-latency"]
    assert main(argv) == 0, capsys.readouterr().err
    assert planted["marker"].read_text() == "called"


@pytest.mark.parametrize("factory", ["os:abort", "sys:exit"])
def test_an_abort_factory_is_refused_with_a_message(tmp_path, factory):
    # before the fix, this metadata killed `prunekit eval` with SIGABRT and no message; sys:exit gave exit 0. A
    # subprocess, so that a regression fails this test instead of killing the test run.
    path = save_compressed(tmp_path / "f.safetensors", _factory_model(),
                           {"factory": factory, "input_shape": [1, 12, 12]}, [], {"data": {"name": "synthetic"}})
    proc = subprocess.run([sys.executable, "-m", "prunekit.cli", "eval", str(path)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert f"asks to import {factory.split(':')[0]!r}" in proc.stderr


def test_python_m_does_not_import_a_helper_next_to_the_file(tmp_path):
    """Under ``python -m prunekit.cli`` the current folder is on sys.path: a ``helper.py`` beside the checkpoint
    would be importable, and must still not be imported."""
    marker = tmp_path / "marker.txt"
    (tmp_path / "helper.py").write_text(textwrap.dedent(FACTORY_SOURCE.format(marker=str(marker))))
    save_compressed(tmp_path / "f.safetensors", _factory_model(), {"factory": "helper:build",
                                                                  "input_shape": [1, 12, 12]}, [],
                    {"data": {"name": "synthetic"}})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "prunekit.cli", "eval", "f.safetensors"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "--trust-factory helper:build" in proc.stderr
    assert not marker.exists()


# ------------------------------------------------------------------------------------- metadata of the wrong shape


def _rewrite(src: Path, dst: Path, edit) -> Path:
    """Copy a checkpoint with its JSON metadata replaced by ``edit(metadata)`` (tensors unchanged)."""
    with safe_open(str(src), framework="pt") as f:
        meta = json.loads(f.metadata()["prunekit"])
    save_file(load_file(str(src)), str(dst), metadata={"prunekit": json.dumps(edit(meta))})
    return dst


def _set(path: str, value):
    """An edit setting a dotted field (``None`` deletes it)."""

    def edit(meta):
        *parents, last = path.split(".")
        node = meta
        for key in parents:
            node = node[key]
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
        return meta

    return edit


def _whole(value):
    def edit(meta):
        return value if not isinstance(value, dict) else {**meta, **value}

    return edit


CHANNELS = "architecture_changes"
BAD_METADATA = {
    "whole-list": (_whole([1, 2]), "must be a JSON object, got a list"),
    "whole-string": (lambda m: "x", "must be a JSON object, got a string"),
    "whole-null": (lambda m: None, "must be a JSON object, got null"),
    "format": (_set("format", "prunekit.checkpoint/9"), "unsupported checkpoint format"),
    "model-list": (_set("model", [1]), "field 'model' must be an object"),
    "model-string": (_set("model", "lenet300"), "field 'model' must be an object"),
    "model-missing": (_set("model", None), "no model description"),
    "model-empty": (_set("model", {}), "field 'model'"),
    "model-name-int": (_set("model.name", 5), "field 'model'"),
    "model-width-text": (_set("model.width", "wide"), "width must be a positive number"),
    "model-unknown-field": (_set("model.depth", 3), "unknown ModelConfig fields ['depth']"),
    "model-input-shape": (_set("model.input_shape", "1x12x12"), "'model.input_shape'"),
    "model-input-shape-short": (_set("model.input_shape", [144]), "a list of 3 positive ints (C, H, W)"),
    "model-input-shape-other": (_set("model.input_shape", [3, 12, 12]), "= [1, 12, 12] for a zoo model"),
    "factory-int": (_set("model", {"factory": 5, "input_shape": [1, 12, 12]}), "'model.factory'"),
    "factory-no-shape": (_set("model", {"factory": "os:abort"}), "holds 'factory' and 'input_shape' only"),
    "factory-extra": (_set("model", {"factory": "a:b", "input_shape": [1, 12, 12], "x": 1}), "'input_shape' only"),
    "changes-string": (_set(CHANNELS, "channels"), "'architecture_changes' must be a list"),
    "changes-ints": (_set(CHANNELS, [1, 2]), "'architecture_changes[0]' must be an object"),
    "change-kind": (_set(CHANNELS, [{"kind": "nope"}]), "'architecture_changes[0].kind' must be one of"),
    "change-removed-list": (_set(CHANNELS, [{"kind": "channels", "removed": [1]}]), ".removed' must be an object"),
    "change-removed-text": (_set(CHANNELS, [{"kind": "channels", "removed": {"fc1": "3"}}]), "removed[fc1]"),
    "change-negative": (_set(CHANNELS, [{"kind": "channels", "removed": {"fc1": [-1]}}]), "removed[fc1]"),
    "change-out-of-range": (_set(CHANNELS, [{"kind": "channels", "removed": {"fc1": [10 ** 6]}}]),
                            "cannot rebuild the network"),
    "change-unknown-layer": (_set(CHANNELS, [{"kind": "channels", "removed": {"nolayer": [1]}}]),
                             "cannot rebuild the network"),
    "change-every-channel": (_set(CHANNELS, [{"kind": "channels", "removed": {"fc1": list(range(300))}}]),
                             "at least one must stay"),
    "change-ignore-text": (_set(CHANNELS, [{"kind": "channels", "removed": {}, "ignore": "fc1"}]), ".ignore'"),
    "eigen-huge-rank": (_set(CHANNELS, [{"kind": "eigenbasis", "layers": {"fc1": {
        "spec": {"kind": "linear", "in_channels": 144, "out_channels": 300, "kernel_size": [1, 1],
                 "stride": [1, 1], "padding": [0, 0], "dilation": [1, 1], "bias": True},
        "rank_in": 10 ** 9, "rank_out": 4, "form": "standard"}}}]), "beyond its 144 inputs"),
    "eigen-wrong-spec": (_set(CHANNELS, [{"kind": "eigenbasis", "layers": {"fc1": {
        "spec": {"kind": "linear", "in_channels": 7, "out_channels": 300, "kernel_size": [1, 1],
                 "stride": [1, 1], "padding": [0, 0], "dilation": [1, 1], "bias": True},
        "rank_in": 4, "rank_out": 4, "form": "standard"}}}]), "but the model's layer is Linear"),
    "eigen-no-spec": (_set(CHANNELS, [{"kind": "eigenbasis", "layers": {"fc1": {"rank_in": 1, "rank_out": 1,
                                                                               "form": "standard"}}}]), ".spec'"),
    "metrics-list": (_set("metrics", [0.9]), "field 'metrics' must be an object"),
    "metrics-text": (_set("metrics", {"test_acc": "high"}), "'metrics.test_acc' must be a number or null"),
    "data-list": (_set("data", []), "field 'data' must be an object"),
    "data-unknown": (_set("data", {"name": "imagenet"}), "unknown dataset 'imagenet'"),
    "data-fraction": (_set("data", {"name": "synthetic", "val_fraction": 5}), "val_fraction must be in (0, 1)"),
    "admm-list": (_set("admm", []), "field 'admm' must be an object"),
    "admm-quant": (_set("admm", {"quant": "bits=64"}), "'admm.quant' is not a quantization"),
    "scales-list": (_set("scales", [1]), "field 'scales' must be an object"),
    "epoch-text": (_set("epoch", "1"), "field 'epoch' must be a non-negative int"),
    "rounds-text": (_set("rounds", "x"), "field 'rounds' must be a list of objects"),
    "dense-hash": (_set("dense_sha256", "abc"), "'dense_sha256' must be 64 hex digits"),
}
READERS = ("eval", "inspect", "export", "bench", "compare-dense", "compare-variant", "bench-dense", "prune")


@pytest.fixture(scope="module")
def good_checkpoints(tmp_path_factory, synthetic):
    """A pruned zoo checkpoint (one channel change) and its dense network."""
    root = tmp_path_factory.mktemp("meta")
    torch.manual_seed(0)
    dense = create_model(MODEL)
    meta = {"data": synthetic.config.to_dict(), "metrics": {"test_acc": 0.5}}
    dense_path = save_compressed(root / "dense.safetensors", dense, MODEL.to_dict(), [], meta)
    plan = ChannelPlan({"fc1": tuple(range(0, 300, 3))})
    ChannelGraph(dense, synthetic.train[:2][0]).shrink_(plan)
    pruned = save_compressed(root / "pruned.safetensors", dense, MODEL.to_dict(), [plan.to_dict()], meta)
    return root, dense_path, pruned


@pytest.mark.parametrize("variant", sorted(BAD_METADATA))
def test_metadata_of_the_wrong_shape_is_one_line_in_every_reader(good_checkpoints, tmp_path, variant, capsys):
    root, dense, pruned = good_checkpoints
    edit, expected = BAD_METADATA[variant]
    bad = _rewrite(pruned, tmp_path / "bad.safetensors", edit)
    for case in READERS:
        argv = _loading_commands(bad, dense, tmp_path)[case]
        assert main(argv) == 2, case
        line = one_error_line(capsys, argv[0])
        assert expected in line, (case, line)
        assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "pruned").exists()


def test_metadata_errors_name_the_field_from_python(good_checkpoints, tmp_path):
    _, _, pruned = good_checkpoints
    bad = _rewrite(pruned, tmp_path / "bad.safetensors", _set("metrics", {"test_acc": [1]}))
    with pytest.raises(MetadataError, match="metadata field 'metrics.test_acc' must be a number or null"):
        read_metadata(bad)
    assert issubclass(MetadataError, CheckpointError)


def test_missing_optional_model_fields_take_their_defaults(good_checkpoints, tmp_path, capsys):
    # `model.width` missing used to crash inspect with KeyError; the schema fills the default in
    _, _, pruned = good_checkpoints
    lean = _rewrite(pruned, tmp_path / "lean.safetensors", _set("model.width", None))
    assert read_metadata(lean)["model"]["width"] == 1.0
    assert main(["inspect", str(lean)]) == 0
    assert "lenet300 (width 1.0), 1 architecture change(s)" in capsys.readouterr().out


def test_integer_weights_are_refused_not_cast(good_checkpoints, tmp_path, capsys):
    _, dense, _ = good_checkpoints
    tensors = load_file(str(dense))
    tensors["fc1.weight"] = tensors["fc1.weight"].to(torch.int32)
    with safe_open(str(dense), framework="pt") as f:
        header = f.metadata()
    save_file(tensors, str(tmp_path / "int.safetensors"), metadata=header)
    assert main(["eval", str(tmp_path / "int.safetensors")]) == 2
    line = one_error_line(capsys, "eval")
    assert "holds fc1.weight as torch.int32, but the model needs floating-point values" in line


def test_compare_refuses_scales_of_layers_the_network_lacks(good_checkpoints, tmp_path, capsys):
    _, dense, pruned = good_checkpoints
    for scales in ({"nolayer": 1.0}, {"": 1.0}):
        bad = _rewrite(pruned, tmp_path / "bad.safetensors",
                       lambda m, scales=scales: {**m, "admm": {"quant": "bits=4"}, "scales": scales})
        assert main(["compare", str(dense), "--variant", f"a={bad}", "--min-run-time", "0.01"]) == 2
        assert "metadata field 'scales' names" in one_error_line(capsys, "compare")


def test_a_recipe_naming_a_factory_imports_nothing(planted, capsys):
    """A recipe is data too: its model factory runs only with --trust-factory in the command (the recipe's own
    trusted_factories list is not trusted)."""
    recipe = planted["dir"] / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "method": "l1", "configs": [{"target": "params=0.5"}],
        "job": {"source": {"model": "plantedfactory:build", "data": {"name": "synthetic"},
                           "trusted_factories": ["plantedfactory:build"]}, "measure_latency": False}}))
    out = planted["dir"] / "out"
    assert main(["prune", "--config", str(recipe), "--out", str(out), "--no-progress"]) == 2
    line = one_error_line(capsys, "prune")
    assert "the recipe asks to import 'plantedfactory'" in line and "--trust-factory plantedfactory:build" in line
    assert not planted["marker"].exists() and "plantedfactory" not in sys.modules
    assert main(["prune", "--config", str(recipe), "--out", str(out), "--no-progress", "--trust-factory",
                 "plantedfactory:build"]) == 0
    assert planted["marker"].read_text() == "called"
    written = yaml.safe_load((out / "recipe.yaml").read_text())
    assert written["job"]["source"]["trusted_factories"] == []  # trust is never written into a recipe
