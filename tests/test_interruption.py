"""Exact resume after a kill at any instant, and one line (never a traceback) for a training state of the wrong
shape.

A forked child runs the job with ``os.replace`` (the commit step of every atomic write) patched to end the process
with ``os._exit`` just before or just after its k-th call, as ``kill -9`` would: no clean-up handler runs, and a
temporary file is left behind when the kill comes before the rename. The parent then resumes in the same folder
and must end with exactly the tensors and history of an uninterrupted run, and no temporary file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import prunekit
from kills import KILLED, counting_replaces, run_killed
from prunekit.cli import main
from prunekit.data import DataConfig
from prunekit.jobs import train_job
from prunekit.persistence.checkpoint import CheckpointError
from prunekit.training import TrainConfig

DATA = DataConfig("synthetic", limit=200)
TRAIN = TrainConfig(epochs=3, batch_size=64, lr=0.05, augment="crop", seed=3)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _no_timing(rows):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def _train(out: Path, resume: bool = False):
    """A ResNet-20 (width 0.25): BatchNorm running statistics and batch counters must come back exactly too."""
    return lambda: train_job("resnet20", DATA, TRAIN, out, width=0.25, resume=resume, progress=False,
                             log=lambda *_: None, measure_latency=False)


@pytest.mark.slow
def test_train_resumes_exactly_after_a_kill_at_every_write(tmp_path):
    reference = tmp_path / "reference"
    writes = counting_replaces(_train(reference))[1]
    assert writes >= 3 * 2 + 3  # per epoch: the commit and the last view (+ best); then model, history, plot
    expected, history = _tensors(reference / "model.safetensors"), json.loads((reference / "history.json").read_text())
    assert any(k.endswith("num_batches_tracked") for k in expected)
    for k in range(1, writes + 1):
        for after in (False, True):
            out = tmp_path / f"kill-{k}-{'after' if after else 'before'}"
            assert run_killed(_train(out), k, after) == KILLED
            committed = (out / "train_state.pt").is_file()
            _train(out, resume=committed)()  # before the first commit there is nothing to resume: start again
            assert _same(_tensors(out / "model.safetensors"), expected), (k, after)
            assert _no_timing(json.loads((out / "history.json").read_text())) == _no_timing(history), (k, after)
            assert not list(out.rglob(".*.tmp*")), (k, after)


def _prune(checkpoint: Path, out: Path, resume: bool = False):
    config = prunekit.L1Config(target="flops=0.4", schedule=prunekit.RoundSchedule(2), finetune_epochs=1)
    return lambda: prunekit.prune_job(config, checkpoint=checkpoint,
                                      train=prunekit.TrainConfig(epochs=0, lr=0.02, batch_size=64), out=out,
                                      resume=resume, progress=False, log=lambda *_: None, measure_latency=False)


@pytest.mark.slow
def test_iterative_prune_resumes_exactly_after_a_kill_at_every_write(tmp_path):
    dense = train_job("lenet300", DATA, TrainConfig(epochs=2, batch_size=64), tmp_path / "dense", progress=False,
                      log=lambda *_: None, measure_latency=False).checkpoint
    reference = tmp_path / "reference"
    writes = counting_replaces(_prune(dense, reference))[1]
    final = Path("flops-0.4") / "model.safetensors"
    expected = _tensors(reference / final)
    report = json.loads((reference / "report.json").read_text())

    def rounds(rep):
        return {k: [{f: v for f, v in r.items() if not f.startswith("seconds")} for r in run["rounds"]]
                for k, run in rep["runs"].items()}

    for k in range(1, writes + 1):
        for after in (False, True):
            out = tmp_path / f"kill-{k}-{'after' if after else 'before'}"
            assert run_killed(_prune(dense, out), k, after) == KILLED
            _prune(dense, out, resume=(out / "recipe.yaml").is_file())()  # no recipe yet: nothing to resume
            assert _same(_tensors(out / final), expected), (k, after)
            assert rounds(json.loads((out / "report.json").read_text())) == rounds(report), (k, after)
            assert not list(out.rglob(".*.tmp*")), (k, after)


def test_prune_resume_refuses_another_dense_network_killed_in_round_1(tmp_path):
    """Killed during round 1's fine-tuning, no round is saved yet; the run record still ties the folder to its
    dense network, so a resume from another one (same architecture) is refused instead of continuing its epochs."""
    first = train_job("lenet300", DATA, TrainConfig(epochs=1, batch_size=64, seed=0), tmp_path / "a", progress=False,
                      log=lambda *_: None, measure_latency=False).checkpoint
    other = train_job("lenet300", DATA, TrainConfig(epochs=1, batch_size=64, seed=1), tmp_path / "b", progress=False,
                      log=lambda *_: None, measure_latency=False).checkpoint
    out = tmp_path / "pruned"
    config = prunekit.L1Config(target="flops=0.5", allocation=prunekit.AllocationConfig("uniform"), finetune_epochs=2)
    run = lambda checkpoint, resume=False: prunekit.prune_job(  # noqa: E731
        config, checkpoint=checkpoint, train=prunekit.TrainConfig(epochs=0, lr=0.01, batch_size=64), out=out,
        resume=resume, progress=False, log=lambda *_: None, measure_latency=False)
    # the job names its checkpoint by path (recipe.yaml), so the other network comes in the same file: only the run
    # record's fingerprint of the dense weights tells them apart
    dense = tmp_path / "dense.safetensors"
    dense.write_bytes(first.read_bytes())
    # recipe.yaml, run.json, then fine-tuning epoch 1
    assert run_killed(lambda: run(dense), 3, after=True) == KILLED
    assert (out / "flops-0.5" / "round_1" / "finetune" / "train_state.pt").is_file()
    assert not (out / "flops-0.5" / "round_1" / "pruned.safetensors").exists()
    with pytest.raises(CheckpointError, match="its recipe.yaml describes another job"):
        run(other, resume=True)  # another checkpoint file: another job
    dense.write_bytes(other.read_bytes())
    with pytest.raises(CheckpointError, match="its recipe.yaml describes another job"):
        run(dense, resume=True)  # the recipe records the dense network's fingerprint too
    # and so does the run record below it, which guards prune_ called on the run folder itself
    net, meta = prunekit.load_compressed(other)
    ctx = prunekit.RunContext(train=prunekit.TrainConfig(epochs=0, lr=0.01, batch_size=64), folder=out / "flops-0.5",
                              resume=True, base=meta["model"], log=lambda *_: None)
    with pytest.raises(CheckpointError, match="it was started from another dense network"):
        prunekit.prune_(net.train(), config, prunekit.load_dataset(DATA), ctx)
    dense.write_bytes(first.read_bytes())
    run(dense, resume=True)  # the right network continues


def test_a_kill_leaves_a_temporary_that_the_next_run_removes(tmp_path):
    out = tmp_path / "run"
    assert run_killed(_train(out), 1, after=False) == KILLED
    assert len(list(out.glob(".train_state.pt.prunekit-*.tmp.pt"))) == 1
    _train(out)()
    assert not list(out.glob(".*.tmp*"))


# ------------------------------------------------------------------------------ training state of the wrong shape


TRAIN_ARGS = ["train", "--model", "lenet300", "--data", "synthetic", "--limit", "200", "--epochs", "2",
              "--batch-size", "64", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory):
    """A 2-epoch run stopped after its first epoch (the state then holds 1 of 2 epochs)."""
    out = tmp_path_factory.mktemp("state") / "run"
    assert main([*TRAIN_ARGS, "--epochs", "1", "--out", str(out)]) == 0
    state = torch.load(out / "train_state.pt", weights_only=True)
    state["config"]["epochs"] = 2
    return out, state


def _edit(state, key, value):
    state = {**state, "history": [dict(r) for r in state["history"]]}
    if value is _DROP:
        state.pop(key)
    else:
        state[key] = value
    return state


_DROP = object()
BAD_STATES = {
    "a-list": (lambda s: [s], "holds a list, not a prunekit training state"),
    "no-optimizer": (lambda s: _edit(s, "optimizer", _DROP), "field 'optimizer' must be an optimizer state_dict"),
    "optimizer-list": (lambda s: _edit(s, "optimizer", [1]), "field 'optimizer'"),
    "history-row-missing-keys": (lambda s: _edit(s, "history", [{"epoch": 1}]), "field 'history[0]'"),
    "history-too-long": (lambda s: _edit(s, "history", s["history"] * 3), "a list of at most 2 epochs"),
    "best-epoch-text": (lambda s: _edit(s, "best_epoch", "1"), "field 'best_epoch'"),
    "model-not-tensors": (lambda s: _edit(s, "model", {"fc1.weight": 1}), "field 'model'"),
    "model-wrong-shape": (lambda s: _edit(s, "model", {**s["model"], "fc1.weight": torch.zeros(3, 3)}),
                          "shape mismatch for fc1.weight"),
    "rng-missing": (lambda s: _edit(s, "rng", _DROP), "field 'rng'"),
    "old-format": (lambda s: _edit(s, "format", _DROP), "written by an older prunekit"),
    "optimizer-other-groups": (lambda s: _edit(s, "optimizer", {"state": {}, "param_groups": [
        {**s["optimizer"]["param_groups"][0], "params": [0]}]}), "the optimizer state does not fit"),
}


@pytest.mark.parametrize("variant", sorted(BAD_STATES))
def test_a_wrong_training_state_is_one_line_on_resume(one_epoch_run, tmp_path, variant, capsys):
    source, state = one_epoch_run
    out = tmp_path / "run"
    out.mkdir()
    for f in source.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    edit, expected = BAD_STATES[variant]
    torch.save(edit(state), out / "train_state.pt")
    capsys.readouterr()
    assert main([*TRAIN_ARGS, "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("prunekit train: error: "), err
    assert expected in err[0]


def test_the_unedited_state_resumes(one_epoch_run, tmp_path):
    source, state = one_epoch_run
    out = tmp_path / "run"
    out.mkdir()
    for f in source.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    (out / "model.safetensors").unlink()
    torch.save(state, out / "train_state.pt")
    assert main([*TRAIN_ARGS, "--out", str(out), "--resume"]) == 0
    assert len(json.loads((out / "history.json").read_text())) == 2
