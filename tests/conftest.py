"""Shared fixtures: tiny in-memory data (no downloads) and a small model factory with a fixed seed."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from prunekit.data import DataSplits, load_dataset
from prunekit.models import create_model

# Test modules import shared helpers (``architectures``) by plain name; pytest runs with --import-mode=importlib,
# which does not put the tests folder on sys.path.
if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))

# Tests use tiny models, for which one intra-op thread is as fast as two and never oversubscribes the cores
# when other work (a training run, the other test worker of `make test`) shares the machine. Subprocesses (the
# CLI, benchmarks' --quick runs) inherit one thread through the environment.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def synthetic() -> DataSplits:
    """The 1x12x12, 4-class Gaussian-blob problem: 461 train / 51 val / 128 test, built in memory.

    Session-scoped for speed: tests must not modify its tensors in place.
    """
    return load_dataset("synthetic")


@pytest.fixture(scope="session")
def digits() -> DataSplits:
    """scikit-learn's embedded 8x8 digits (1x8x8, 10 classes)."""
    return load_dataset("digits")


@pytest.fixture
def make_lenet300(synthetic):
    """``make_lenet300(seed=0, width=1.0)`` -> a LeNet-300-100 sized for ``synthetic``, initialised from ``seed``."""

    def make(seed: int = 0, width: float = 1.0) -> torch.nn.Module:
        torch.manual_seed(seed)
        return create_model("lenet300", num_classes=synthetic.num_classes, in_channels=synthetic.in_channels,
                            input_size=synthetic.input_size, width=width)

    return make
