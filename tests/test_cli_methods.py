"""``prunekit prune METHOD``: flags generated from the method's config; every flag of every other method is refused
in one line (the whole flag x method matrix); every own flag parses; a written recipe re-runs through
``--config`` to the same pruned networks; and no code outside the registry compares method names."""

from __future__ import annotations

import enum
import re
import typing
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import prunekit
from prunekit.cli import build_parser, main
from prunekit.configs import _options, leaf_fields
from prunekit.flags import flags_of

METHODS = prunekit.list_methods()
ALL_FLAGS = sorted({flag for m in METHODS for flag in flags_of(prunekit.get_method(m).config)})
SRC = Path(__file__).resolve().parents[1] / "src" / "prunekit"
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _example_value(info) -> list[str]:
    """Command-line words that set ``info``'s field to a valid value (its default)."""
    kind = _options(info.annotation)[0][0]
    default = info.default
    if kind is bool:
        return []
    if info.path[-1] == "target":
        return ["params=0.1" if default is None else default.to_text()]
    if isinstance(default, enum.Enum):
        return [default.value]
    origin = typing.get_origin(kind)
    if origin is tuple:
        return [str(v) for v in default] or []
    if origin is dict:
        return ["fc1=0.5"]
    if default is None:
        return ["2" if kind in (int, float) else "x"]
    return [str(getattr(default, "to_text", lambda: default)())]


@pytest.mark.parametrize("method", METHODS)
def test_every_flag_of_another_method_is_refused_in_one_line(method, tmp_path, capsys):
    own = set(flags_of(prunekit.get_method(method).config))
    foreign = [flag for flag in ALL_FLAGS if flag not in own]
    assert foreign, f"{method} takes every flag there is?"
    for flag in foreign:
        code = main(["prune", method, "--model", "lenet5", "--out", str(tmp_path / "out"), f"{flag}=1"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, (method, flag, err)
        assert err[0].startswith(f"prunekit prune: error: {flag} does not apply to {method} (it is a flag of "), err
        assert f"`prunekit prune {method} --help` lists its flags" in err[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", METHODS)
def test_every_own_flag_parses_into_the_config(method):
    from prunekit.flags import configs_from_args

    spec = prunekit.get_method(method)
    base = ["prune", method, "--model", "lenet5", "--out", "x"]
    for info in leaf_fields(spec.config):
        kind = _options(info.annotation)[0][0]
        if kind is bool:
            words = [("--no-" + info.flag[2:]) if info.default is True else info.flag]
        else:
            words = [info.flag, *_example_value(info)]
        args, extras = build_parser().parse_known_args([*base, *words])
        assert extras == [], (method, words)
        assert hasattr(args, "cfg__" + info.dest), (method, words)
        if info.default is None:  # k, n, tiles, a target: valid only with other settings
            continue
        (config,) = configs_from_args(spec.config, args.config_fields, args)
        leaf = config.to_dict()
        for key in info.path:
            leaf = leaf[key]
        if kind is bool:  # the flag flips the default
            assert leaf is (not info.default), (method, words)
        elif typing.get_origin(kind) is dict:
            assert leaf == {"fc1": 0.5}, (method, words)
        else:  # the default given explicitly builds the default
            assert config == spec.config(), (method, words)


@pytest.mark.parametrize("method", ["l1", "eigendamage", "admm", "dpp"])
def test_help_shows_only_the_methods_flags(method, capsys):
    with pytest.raises(SystemExit):
        main(["prune", method, "--help"])
    text = capsys.readouterr().out
    shown = set(re.findall(r"(--[a-z][a-z0-9-]*)", text))
    own = set(flags_of(prunekit.get_method(method).config))
    job = {"--model", "--checkpoint", "--data", "--data-dir", "--val-fraction", "--limit", "--trust-factory", "--out",
           "--resume", "--seed", "--lr", "--warmup", "--batch-size", "--augment", "--no-latency", "--no-progress",
           "--distill-steps", "--distill-lr", "--help"}
    assert own <= shown
    assert shown - own - job == set(), shown - own - job


@pytest.mark.parametrize("method", ["l1", "eigendamage", "admm", "dpp"])
def test_the_job_flags_set_the_fine_tuning_recipe_over_the_methods_own(method):
    from prunekit.cli import _recipe_from_args
    from prunekit.training import FINETUNE_LR, FINETUNE_WARMUP

    spec = prunekit.get_method(method)
    own = (0.01, 0.0) if method in ("admm", "dpp") else (FINETUNE_LR, FINETUNE_WARMUP)  # what their benchmarks use
    assert (spec.lr, spec.warmup) == own
    base = ["prune", method, "--model", "lenet5", "--data", "synthetic", "--out", "x"]
    train = _recipe_from_args(build_parser().parse_args(base)).job.train
    assert (train.lr, train.warmup) == own
    train = _recipe_from_args(build_parser().parse_args([*base, "--lr", "0.03", "--warmup", "0.2"])).job.train
    assert (train.lr, train.warmup) == (0.03, 0.2)


def test_the_old_method_flag_points_to_the_new_form(capsys):
    assert main(["prune", "--method", "l1", "--out", "x"]) == 2
    assert "the method is now the first word: prunekit prune METHOD" in capsys.readouterr().err


def test_a_bad_value_is_one_line(capsys):
    assert main(["prune", "l1", "--model", "lenet5", "--out", "x", "--max-per-layer", "abc"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["prunekit prune: error: argument --max-per-layer: expected a number, got 'abc'"]


@pytest.mark.slow
def test_a_written_recipe_reruns_to_the_same_networks(tmp_path, capsys):
    assert main(["train", "--model", "lenet5", "--data", "synthetic", "--limit", "200", "--epochs", "1",
                 "--width", "0.5", "--out", str(tmp_path / "dense"), "--no-progress"]) == 0
    argv = ["prune", "taylor", "--checkpoint", str(tmp_path / "dense" / "model.safetensors"), "--target", "flops=0.5",
            "--target", "params=0.4", "--finetune-epochs", "1", "--score-batches", "2", "--no-latency",
            "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "first")]) == 0
    recipe = tmp_path / "first" / "recipe.yaml"
    assert main(["prune", "--config", str(recipe), "--out", str(tmp_path / "again"), "--no-progress"]) == 0
    capsys.readouterr()
    for label in ("flops-0.5", "params-0.4"):
        a, b = (prunekit.read_metadata(tmp_path / run / label / "model.safetensors") for run in ("first", "again"))
        assert a["architecture_changes"] == b["architecture_changes"] and a["config"] == b["config"]
        ta, tb = (load_file(str(tmp_path / run / label / "model.safetensors")) for run in ("first", "again"))
        assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert (tmp_path / "again" / "recipe.yaml").read_text() == recipe.read_text()


def test_a_bad_recipe_is_one_line(tmp_path, capsys):
    (tmp_path / "r.yaml").write_text("method: l1\nconfigs: [{target: flops=2}]\njob: {source: {model: lenet5}}\n")
    assert main(["prune", "--config", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "target keep fraction must be in (0, 1)" in err[0]
    (tmp_path / "r.yaml").write_text("method: l7\n")
    assert main(["prune", "--config", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "unknown method 'l7'" in capsys.readouterr().err


_COMPARISON = re.compile(r"""(==|!=|\bin)\s*[\(\[{]?\s*["'](""" + "|".join(map(re.escape, METHODS)) + r""")["']""")


def test_no_method_name_comparison_outside_the_registry():
    """Callers dispatch through the registry (get_method, method_for, the config's type), never on the name."""
    offenders = []
    for path in [*SRC.rglob("*.py"), *BENCHMARKS.rglob("*.py")]:
        if path.name == "registry.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if _COMPARISON.search(line):
                offenders.append(f"{path.relative_to(SRC.parents[1])}:{number}: {line.strip()}")
    assert offenders == []


@pytest.mark.parametrize("recipe, message", [
    ("method: l1\nconfigs: [{}]\njob: {source: {model: lenet5, data: synthetic}}\n",
     "ModelSource.data must be a mapping of DataConfig fields or null, got 'synthetic'"),
    ("method: l1\nconfigs: [{allocation: uniform}]\njob: {source: {model: lenet5}}\n",
     "L1Config.allocation must be a mapping of AllocationConfig fields, got 'uniform'"),
    ("method: l1\nconfigs: [{schedule: 3}]\njob: {source: {model: lenet5}}\n",
     "L1Config.schedule must be a mapping of RoundSchedule fields, got 3"),
    ("method: admm\nconfigs: [{rates: [fc1, 0.5]}]\njob: {source: {model: lenet5}}\n",
     "ADMMConfig.rates must be a mapping of name: value"),
    ("method: l1\nconfigs: [{allocation: {max_per_layer: '0.9'}}]\njob: {source: {model: lenet5}}\n",
     "AllocationConfig.max_per_layer must be a number, got '0.9'"),
    ("method: admm\nconfigs: [{include_output: 'false'}]\njob: {source: {model: lenet5}}\n",
     "ADMMConfig.include_output must be true or false, got 'false'"),
    ("method: l1\nconfigs: [{}]\njob: {source: {model: lenet5}, measure_latency: 'no'}\n",
     "JobConfig.measure_latency must be true or false"),
    ("method: l1\nconfigs: [{ignore: conv1}]\njob: {source: {model: lenet5}}\n", "L1Config.ignore must be a list"),
    ("method: l1\nconfigs: {target: flops=0.5}\njob: {source: {model: lenet5}}\n", "configs must be a list"),
    ("method: l1\nconfigs: [{}]\njob: {source: null}\n", "JobConfig.source must be a mapping"),
    ("method: l1\nconfigs: [{}]\njob: {source: {model: lenet5, data: {name: synthetic, limit: 200}, "
     "limit: 300}}\n", "unknown ModelSource fields ['limit']"),
    ("method: l1\nconfigs: [{}]\njob: {source: {model: lenet5, model: resnet20}}\n", "the key 'model' is given twice"),
    ("method: l1\nconfigs: [{}]\njob: {source: {model: lenet5}, train: {epochs: 5}}\n",
     "job.train.epochs must be 0"),
    ("method: l1\nconfigs: [{target: flops=0.5}, {target: flops=x2}]\njob: {source: {model: lenet5}}\n",
     "two runs of this job would both write the run folder 'flops-0.5'"),
])
def test_a_recipe_of_the_wrong_shape_is_one_line(tmp_path, capsys, recipe, message):
    (tmp_path / "r.yaml").write_text(recipe)
    assert main(["prune", "--config", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "o").exists()


def test_a_recipe_that_is_not_text_is_one_line(tmp_path, capsys):
    (tmp_path / "r.yaml").write_bytes(b"\xff\xfe\x00garbage")
    assert main(["prune", "--config", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert f"the recipe {tmp_path / 'r.yaml'} is not UTF-8 text" in capsys.readouterr().err


def test_duplicate_targets_are_refused_before_any_work(tmp_path, capsys):
    argv = ["prune", "l1", "--model", "lenet5", "--data", "synthetic", "--target", "flops=0.5", "--target",
            "flops=x2", "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    assert "would both write the run folder 'flops-0.5'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
