"""torchrun with 2 CPU processes (gloo) trains the same network as one process: same final weights (to float
rounding), same accuracies, and only rank 0 reports."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prunekit.persistence.checkpoint import read_metadata

pytestmark = pytest.mark.slow

TRAIN = ["-m", "prunekit.cli", "train", "--model", "lenet300", "--data", "synthetic", "--epochs", "2",
         "--augment", "none", "--batch-size", "64", "--device", "cpu", "--no-progress"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(out: Path, nproc: int, extra: list[str]) -> str:
    launcher = [] if nproc == 1 else [
        "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={_free_port()}"]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, *launcher, *TRAIN, *extra, "--out", str(out)], env=env, cwd=out.parent,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _runs(tmp_path_factory, name: str, extra: list[str]) -> dict[str, tuple[Path, str]]:
    root = tmp_path_factory.mktemp(name)
    return {nproc: (root / f"np{nproc}", _train(root / f"np{nproc}", nproc, extra)) for nproc in (1, 2)}


@pytest.fixture(scope="module")
def even_runs(tmp_path_factory):
    """128 training examples (limit 142, 14 held out): every global batch of 64 splits 32 + 32 over the ranks."""
    return _runs(tmp_path_factory, "even", ["--limit", "142"])


@pytest.fixture(scope="module")
def default_runs(tmp_path_factory):
    """The full synthetic set: 461 training examples, so the last batch (13) does not split evenly."""
    return _runs(tmp_path_factory, "default", [])


def _compare_weights(runs) -> None:
    single = load_file(runs[1][0] / "model.safetensors")
    double = load_file(runs[2][0] / "model.safetensors")
    assert single.keys() == double.keys()
    for key in single:
        torch.testing.assert_close(double[key], single[key], atol=1e-4, rtol=0, msg=f"{key} differs")


def test_two_processes_train_the_same_weights(even_runs):
    _compare_weights(even_runs)


def test_two_processes_report_the_same_metrics(even_runs):
    single = read_metadata(even_runs[1][0] / "model.safetensors")
    double = read_metadata(even_runs[2][0] / "model.safetensors")
    assert single["epoch"] == double["epoch"]
    for key in ("val_acc", "test_acc", "params", "flops", "storage_bits"):
        assert single["metrics"][key] == pytest.approx(double["metrics"][key], abs=1e-9), key
    assert 0.0 <= double["metrics"]["test_acc"] <= 1.0


def test_only_rank_zero_logs_epochs(even_runs):
    out = even_runs[2][1]
    assert sum(line.startswith("synthetic: 128 train / 14 val") for line in out.splitlines()) == 1
    assert sum(line.startswith("epoch ") for line in out.splitlines()) == 2


def test_only_rank_zero_says_saved(even_runs):
    assert sum(line.startswith("saved ") for line in even_runs[2][1].splitlines()) == 1


def test_two_processes_match_one_on_an_uneven_split(default_runs):
    _compare_weights(default_runs)
