"""Checkpoints: exact save/load round trip, rebuild from metadata, and a CheckpointError (never a crash or a
silent partial load) for corrupted, foreign or mismatched files; writes are atomic."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from prunekit.models import ModelConfig, create_model
from prunekit.persistence.checkpoint import (
    FORMAT,
    CheckpointError,
    atomic_folder,
    atomic_write,
    load_model,
    load_state,
    load_weights_,
    read_metadata,
    save_checkpoint,
)

CONFIG = ModelConfig(name="lenet5", num_classes=4, in_channels=1, input_size=12, width=0.5)


def _model(seed: int = 0, config: ModelConfig = CONFIG) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model(config).eval()


def _inputs() -> torch.Tensor:
    return torch.randn(5, 1, 12, 12, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def saved(tmp_path):
    model = _model()
    path = save_checkpoint(tmp_path / "m.safetensors", model, {"model": CONFIG.to_dict(), "note": "hi"})
    return model, path


def test_round_trip_gives_identical_outputs(saved):
    model, path = saved
    other = _model(seed=1)
    with torch.no_grad():
        assert not torch.equal(other(_inputs()), model(_inputs()))
        assert load_weights_(other, path) is None
        assert torch.equal(other(_inputs()), model(_inputs()))
    state = load_state(path)
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_load_model_rebuilds_from_metadata(saved):
    model, path = saved
    rebuilt, meta = load_model(path)
    assert type(rebuilt) is type(model) and not rebuilt.training
    assert ModelConfig.from_dict(meta["model"]) == CONFIG
    assert meta["note"] == "hi" and meta["format"] == FORMAT
    with torch.no_grad():
        assert torch.equal(rebuilt(_inputs()), model(_inputs()))


def test_batchnorm_buffers_round_trip(tmp_path):
    config = ModelConfig(name="resnet20", num_classes=3, in_channels=1, input_size=8, width=0.25)
    model = _model(config=config).train()
    with torch.no_grad():
        model(torch.randn(8, 1, 8, 8))  # moves running statistics away from their initial values
    model.eval()
    path = save_checkpoint(tmp_path / "r.safetensors", model, {"model": config.to_dict()})
    rebuilt, _ = load_model(path)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))
    assert torch.equal(rebuilt.bn1.running_mean, model.bn1.running_mean)
    assert int(rebuilt.bn1.num_batches_tracked) == 1


def test_metadata_is_json_in_the_header(saved):
    _, path = saved
    assert read_metadata(path) == {"format": FORMAT, "model": CONFIG.to_dict(), "note": "hi"}


@pytest.mark.parametrize("keep", [0, 7, 100, -50, -1])
def test_truncated_file_is_a_checkpoint_error(saved, keep):
    _, path = saved
    raw = path.read_bytes()
    path.write_bytes(raw[:keep])
    with pytest.raises(CheckpointError, match=str(path)):
        load_model(path)
    with pytest.raises(CheckpointError):
        load_state(path)


@pytest.mark.parametrize("size", [3, 64, 4096])
def test_random_bytes_are_a_checkpoint_error(tmp_path, size):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(os.urandom(size))
    with pytest.raises(CheckpointError, match=str(path)):
        load_model(path)
    with pytest.raises(CheckpointError, match=str(path)):
        load_weights_(_model(), path)


def test_corrupted_header_metadata(tmp_path):
    path = tmp_path / "bad.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"prunekit": "{not json"})
    with pytest.raises(CheckpointError, match="corrupted metadata"):
        read_metadata(path)


def test_unsupported_format_version(tmp_path):
    path = tmp_path / "future.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"prunekit": json.dumps({"format": "prunekit.checkpoint/9"})})
    with pytest.raises(CheckpointError, match=r"unsupported checkpoint format 'prunekit.checkpoint/9'"):
        read_metadata(path)


def test_file_without_prunekit_metadata(tmp_path):
    path = tmp_path / "foreign.safetensors"
    save_file(_model().state_dict(), str(path))
    with pytest.raises(CheckpointError, match="without prunekit metadata"):
        load_model(path)
    save_file(_model().state_dict(), str(path), metadata={"other": "tool"})
    with pytest.raises(CheckpointError, match="without prunekit metadata"):
        read_metadata(path)


def test_metadata_without_model_entry(tmp_path):
    path = save_checkpoint(tmp_path / "m.safetensors", _model(), {"note": "no model"})
    with pytest.raises(CheckpointError, match="no 'model' entry"):
        load_model(path)


def test_metadata_with_bad_model_description(tmp_path):
    path = save_checkpoint(tmp_path / "m.safetensors", _model(), {"model": {**CONFIG.to_dict(), "name": "lenet"}})
    with pytest.raises(CheckpointError, match="bad model description.*unknown model 'lenet'"):
        load_model(path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nothing.safetensors")


def test_mismatched_width_names_a_tensor(saved):
    _, path = saved
    wider = _model(config=ModelConfig(**{**CONFIG.to_dict(), "width": 1.0}))
    before = {k: v.clone() for k, v in wider.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"shape mismatch for conv1\.bias: checkpoint \(10,\) vs model \(20,\)"):
        load_weights_(wider, path)
    assert all(torch.equal(before[k], v) for k, v in wider.state_dict().items())  # nothing half-loaded


def test_mismatched_architecture_lists_missing_and_unexpected(saved):
    _, path = saved
    other = create_model("lenet300", num_classes=4, in_channels=1, input_size=12)
    with pytest.raises(CheckpointError, match=r"missing fc3\.bias.*; unexpected conv1\.bias, conv1\.weight"):
        load_weights_(other, path)


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    save_checkpoint(tmp_path / "a.safetensors", _model(), {})
    save_checkpoint(tmp_path / "a.safetensors", _model(seed=2), {})  # overwrite
    save_checkpoint(tmp_path / "sub" / "b.safetensors", _model(), {})  # creates the parent
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.safetensors", "b.safetensors", "sub"]


def test_interrupted_write_keeps_the_old_file(saved):
    _, path = saved
    before = path.read_bytes()

    def write_half_then_fail(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(before[:10])
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, write_half_then_fail)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    read_metadata(path)  # still a valid checkpoint


def test_atomic_write_gives_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        atomic_write(tmp_path / "f.txt", lambda tmp: Path(tmp).write_text("x"))
    finally:
        os.umask(umask)
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o644


def test_a_cache_folder_published_meanwhile_by_another_process_is_kept(tmp_path):
    """Two processes filling the same cache: the second finds the first's folder on publishing and keeps it."""
    folder = tmp_path / "cache" / "model"

    def write(tmp):
        (Path(tmp) / "weights").write_text("mine")
        folder.mkdir(parents=True)  # the other process publishes while this one writes
        (folder / "weights").write_text("first")

    assert atomic_folder(folder, write, keep_existing=True) == folder
    assert (folder / "weights").read_text() == "first"
    assert [p.name for p in folder.parent.iterdir()] == ["model"]  # the discarded copy is gone

    def replace(tmp):
        (Path(tmp) / "weights").write_text("new")

    atomic_folder(folder, replace)  # the default replaces a finished folder
    assert (folder / "weights").read_text() == "new"
