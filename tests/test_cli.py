"""The command line, run in-process: every misuse exits non-zero with exactly one line on stderr, and the
train -> eval path works end to end."""

from __future__ import annotations

import json
import os
import re

import pytest

from cli_lines import one_error_line
from prunekit import __version__
from prunekit.cli import main
from prunekit.models import list_models
from prunekit.persistence.checkpoint import read_metadata

TRAIN = ["train", "--model", "lenet300", "--data", "synthetic", "--epochs", "1", "--batch-size", "128",
         "--device", "cpu", "--no-progress"]




@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One CLI training run of lenet300 on synthetic data (1 epoch), shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main([*TRAIN, "--out", str(out)]) == 0
    return out


def test_list_prints_models_and_datasets(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "models:" in out and "datasets:" in out and "methods:" in out
    for name in [*list_models(), "digits", "synthetic", "fashion-mnist", "cifar10"]:
        assert re.search(rf"^  {re.escape(name)} ", out, re.MULTILINE), name


def test_list_with_pattern(capsys):
    assert main(["list", "models", "--pattern", "resnet*"]) == 0
    out = capsys.readouterr().out
    assert re.findall(r"^  (\S+)", out, re.MULTILINE) == ["resnet20", "resnet32", "resnet56"]
    assert "datasets:" not in out


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"prunekit {__version__}"


def test_train_then_eval(trained_run, capsys):
    assert sorted(p.name for p in trained_run.iterdir()) == [
        "best.safetensors", "history.json", "last.safetensors", "model.safetensors", "train_state.pt", "training.png",
    ]
    meta = read_metadata(trained_run / "model.safetensors")
    assert meta["model"]["name"] == "lenet300" and meta["data"]["name"] == "synthetic"
    assert meta["train"]["epochs"] == 1 and meta["train"]["augment"] == "crop"  # the default for synthetic data
    assert len(json.loads((trained_run / "history.json").read_text())) == 1

    assert main(["eval", str(trained_run / "model.safetensors")]) == 0
    out = capsys.readouterr()
    match = re.match(r"test accuracy (\d\.\d{4})  loss \d+\.\d{4}  \(synthetic, ", out.out)
    assert match, out.out
    assert float(match.group(1)) == pytest.approx(meta["metrics"]["test_acc"], abs=5e-5)
    assert out.err == ""

    assert main(["eval", str(trained_run / "model.safetensors"), "--split", "val"]) == 0
    assert capsys.readouterr().out.startswith(f"val accuracy {meta['metrics']['val_acc']:.4f}")


def test_train_prints_where_it_saved(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*TRAIN, "--model", "lenet5", "--data", "digits", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines()[0].startswith("digits: ")
    assert captured.out.strip().endswith(f"saved {out / 'model.safetensors'}")
    assert read_metadata(out / "model.safetensors")["model"]["input_size"] == 8


def test_train_refuses_to_overwrite_a_run(trained_run, capsys):
    before = (trained_run / "model.safetensors").read_bytes()
    assert main([*TRAIN, "--out", str(trained_run)]) == 2
    line = one_error_line(capsys, "train")
    assert f"{trained_run} already holds a training run; pass --resume" in line
    assert (trained_run / "model.safetensors").read_bytes() == before


def test_resume_with_changed_settings_is_one_line(trained_run, capsys):
    assert main([*TRAIN, "--out", str(trained_run), "--resume", "--lr", "0.3"]) == 2
    line = one_error_line(capsys, "train")
    assert "training settings differ (lr: saved 0.05 vs now 0.3)" in line


def test_unknown_model(tmp_path, capsys):
    assert main([*TRAIN, "--model", "resnet21", "--out", str(tmp_path / "run")]) == 2
    line = one_error_line(capsys, "train")
    assert "unknown model 'resnet21'; known models: " + ", ".join(list_models()) in line
    assert "Did you mean" in line
    assert not (tmp_path / "run").exists()


def test_unknown_dataset(tmp_path, capsys):
    assert main([*TRAIN, "--data", "imagenet", "--out", str(tmp_path / "run")]) == 2
    assert "unknown dataset 'imagenet'; known datasets: cifar10" in one_error_line(capsys, "train")


def test_missing_data_dir(tmp_path, capsys):
    missing = tmp_path / "nonexistent"
    argv = [*TRAIN, "--data", "fashion-mnist", "--data-dir", str(missing), "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    line = one_error_line(capsys, "train")
    assert f"directory {missing} does not exist" in line
    assert "apt-get install dataset-fashion-mnist" in line


@pytest.mark.parametrize("content", [b"", os.urandom(2000), b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":1}"])
def test_eval_corrupted_checkpoint(tmp_path, capsys, content):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(content)
    assert main(["eval", str(path), "--data", "synthetic"]) == 2
    assert str(path) in one_error_line(capsys, "eval")


def test_eval_truncated_checkpoint(trained_run, tmp_path, capsys):
    path = tmp_path / "cut.safetensors"
    path.write_bytes((trained_run / "model.safetensors").read_bytes()[:-100])
    assert main(["eval", str(path)]) == 2
    line = one_error_line(capsys, "eval")
    assert re.search(f"{re.escape(str(path))} is (not a readable safetensors checkpoint|corrupted)", line), line


def test_eval_missing_checkpoint(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "none.safetensors")]) == 2
    assert "does not exist" in one_error_line(capsys, "eval")


def test_eval_on_data_the_model_was_not_built_for(trained_run, capsys):
    assert main(["eval", str(trained_run / "model.safetensors"), "--data", "digits"]) == 2
    expected = "was built for 1x12x12 inputs with 4 classes; digits has 1x8x8 inputs with 10 classes"
    assert expected in one_error_line(capsys, "eval")


@pytest.mark.parametrize("epochs,message", [("-1", "must be >= 0, got -1"), ("two", "expected a whole number")])
def test_bad_epochs_is_an_argparse_error(tmp_path, capsys, epochs, message):
    with pytest.raises(SystemExit) as info:
        main([*TRAIN, "--epochs", epochs, "--out", str(tmp_path)])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [[], ["frobnicate"], ["train", "--data", "synthetic"], ["list", "widgets"], ["train", "--model", "lenet300",
                                                                                  "--out", "x", "--device", "tpu"]],
    ids=["no-command", "bad-command", "no-model", "bad-list", "bad-device"],
)
def test_argparse_misuse_exits_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "usage: prunekit" in capsys.readouterr().err


def test_bad_train_setting_is_one_line(tmp_path, capsys):
    assert main([*TRAIN, "--lr", "0", "--out", str(tmp_path / "run")]) == 2
    assert "lr must be a positive finite number, got 0.0" in one_error_line(capsys, "train")


def test_interrupt_exits_130(tmp_path, capsys, monkeypatch):
    import prunekit.jobs

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prunekit.jobs, "train_job", interrupted)
    assert main([*TRAIN, "--out", str(tmp_path / "run")]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["interrupted; finished epochs are saved (use --resume to continue)"]
