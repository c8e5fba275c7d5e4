"""No command destroys or mixes a user's files: one writer per output folder (a lock held for the whole run), no
output over an input or over another output, no existing file replaced without --overwrite, no empty --out."""

from __future__ import annotations

import json

import pytest

from cli_lines import one_error_line
from prunekit.cli import main
from prunekit.data import DataConfig
from prunekit.jobs import train_job
from prunekit.persistence.outputs import OutputBusyError, check_output_files, output_dir, output_lock
from prunekit.training import TrainConfig

TRAIN = ["train", "--model", "lenet300", "--data", "synthetic", "--limit", "200", "--epochs", "1", "--batch-size",
         "64", "--device", "cpu", "--no-progress"]




@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("outputs") / "dense"
    return train_job("lenet300", DataConfig("synthetic", limit=200), TrainConfig(epochs=1, batch_size=64), out,
                     progress=False, log=lambda *_: None, measure_latency=False).checkpoint


def test_export_never_writes_over_its_checkpoint(checkpoint, capsys):
    before = checkpoint.read_bytes()
    assert main(["export", str(checkpoint), "--onnx", str(checkpoint), "--overwrite"]) == 2
    line = one_error_line(capsys, "export")
    assert f"--onnx {checkpoint} is the input file" in line
    assert checkpoint.read_bytes() == before


def test_export_refuses_one_path_for_two_outputs(checkpoint, tmp_path, capsys):
    target = tmp_path / "o.x"
    assert main(["export", str(checkpoint), "--onnx", str(target), "--pt2", str(target)]) == 2
    assert f"--onnx and --pt2 both name {target}" in one_error_line(capsys, "export")
    assert not target.exists()


def test_export_replaces_an_existing_file_only_with_overwrite(checkpoint, tmp_path, capsys):
    target = tmp_path / "m.pt2"
    target.write_text("the user's file")
    assert main(["export", str(checkpoint), "--pt2", str(target)]) == 2
    assert "already exists; pass --overwrite" in one_error_line(capsys, "export")
    assert target.read_text() == "the user's file"
    assert main(["export", str(checkpoint), "--pt2", str(target), "--overwrite"]) == 0
    assert target.read_bytes()[:2] == b"PK"  # a torch.export zip archive now
    assert not list(tmp_path.glob(".*.tmp*"))


def test_a_second_writer_is_refused_while_the_first_runs(tmp_path, capsys):
    out = tmp_path / "run"
    with output_lock(out):  # another run holds the folder
        assert main([*TRAIN, "--out", str(out)]) == 2
        assert f"{out} is being written by another prunekit run" in one_error_line(capsys, "train")
        with pytest.raises(OutputBusyError):
            with output_lock(out):
                pass
    assert not (out / "model.safetensors").exists()
    assert main([*TRAIN, "--out", str(out)]) == 0  # the lock went with the first writer


def test_a_finished_run_is_not_mixed_with_a_new_one(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*TRAIN, "--out", str(out), "--seed", "0"]) == 0
    before = (out / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert main([*TRAIN, "--out", str(out), "--seed", "1"]) == 2
    assert "already holds a training run; pass --resume" in one_error_line(capsys, "train")
    assert (out / "model.safetensors").read_bytes() == before


def test_a_killed_prune_run_is_not_restarted_over_its_rounds(checkpoint, tmp_path, capsys):
    out = tmp_path / "pruned"
    (out / "flops-0.5" / "round_1").mkdir(parents=True)  # what a run killed before its report leaves
    assert main(["prune", "l1", "--checkpoint", str(checkpoint), "--out", str(out), "--no-progress",
                 "--no-latency"]) == 2
    line = one_error_line(capsys, "prune")
    assert "already holds a pruning run; pass --resume" in line and "flops-0.5/round_1" in line
    # and so does the run record written before the first round
    (out / "flops-0.5" / "round_1").rmdir()
    (out / "flops-0.5" / "run.json").write_text(json.dumps({"format": "prunekit.run/2"}))
    assert main(["prune", "l1", "--checkpoint", str(checkpoint), "--out", str(out), "--no-progress",
                 "--no-latency"]) == 2
    assert "flops-0.5/run.json" in one_error_line(capsys, "prune")


@pytest.mark.parametrize("argv", [
    [*TRAIN, "--out", ""],
    ["prune", "l1", "--model", "lenet300", "--data", "synthetic", "--out", " "],
    ["demo", "--out", ""],
    ["bench", "x.safetensors", "--out", ""],
    ["compare", "x.safetensors", "--variant", "a=y.safetensors", "--out", ""],
])
def test_an_empty_out_is_refused(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert "--out must name a folder" in one_error_line(capsys, argv[0])
    assert list(tmp_path.iterdir()) == []


def test_output_helpers_validate(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        output_dir(tmp_path / "file")
    with pytest.raises(ValueError, match="must name a folder"):
        output_dir("")
    with pytest.raises(ValueError, match="is a folder; give a file path"):
        check_output_files({"--onnx": tmp_path})
    assert check_output_files({"--onnx": tmp_path / "a.onnx", "--pt2": None}) == {"--onnx": tmp_path / "a.onnx"}


def test_a_run_that_fails_early_leaves_no_folder(tmp_path, capsys):
    out = tmp_path / "never"
    assert main([*TRAIN, "--resume", "--out", str(out)]) == 2  # fails inside the lock: nothing to resume
    assert "nothing to resume" in one_error_line(capsys, "train")
    assert not out.exists()


def test_clean_up_skips_a_sub_folder_another_run_is_writing(tmp_path):
    stale, busy = tmp_path / ".report.json.prunekit-abc.tmp.json", tmp_path / "train"
    with output_lock(busy):
        in_flight = busy / ".train_state.pt.prunekit-xyz.tmp.pt"
        in_flight.write_bytes(b"being written")
        stale.write_text("left by a kill")
        other = tmp_path / ".notes.tmp"  # not prunekit's: never touched
        other.write_text("someone else's")
        with output_lock(tmp_path):
            pass
        assert in_flight.exists() and other.exists()
        assert not stale.exists()


def test_a_lock_does_not_outlive_its_run(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RuntimeError):
        with output_lock(out):
            (out / "partial.json").write_text(json.dumps({}))
            raise RuntimeError("the run failed")
    with output_lock(out):  # released although the run raised
        pass
    assert (out / "partial.json").exists()  # and nothing of the user's was removed


def test_a_run_folder_written_before_a_training_setting_existed_still_resumes(tmp_path):
    from prunekit.persistence.checkpoint import CheckpointError
    from prunekit.persistence.runs import check_or_write_manifest

    run = {"method": "l1", "train": TrainConfig(epochs=0).to_dict()}
    check_or_write_manifest(tmp_path, False, run)
    saved = json.loads((tmp_path / "run.json").read_text())
    del saved["train"]["warmup"]  # as a prunekit without warm-up wrote it
    (tmp_path / "run.json").write_text(json.dumps(saved))
    check_or_write_manifest(tmp_path, True, run)
    with pytest.raises(CheckpointError, match="cannot resume"):
        check_or_write_manifest(tmp_path, True, {**run, "train": TrainConfig(epochs=0, warmup=0.2).to_dict()})
