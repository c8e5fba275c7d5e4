"""Checkpoints written by the 0.1 release (``tests/fixtures/release-0.1``, the commands are in its README) still
load, into networks that give the same outputs as the 0.1 loader did."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prunekit.persistence.architecture import load_compressed

FIXTURES = Path(__file__).parent / "fixtures" / "release-0.1"
EXPECTED = load_file(str(FIXTURES / "expected-outputs.safetensors"))
NAMES = sorted(k for k in EXPECTED if k != "input")


def test_every_fixture_has_expected_outputs():
    assert sorted(p.stem for p in FIXTURES.glob("*.safetensors") if p.stem != "expected-outputs") == NAMES
    assert len(NAMES) == 7


@pytest.mark.parametrize("name", NAMES)
def test_a_release_checkpoint_loads_with_the_same_outputs(name):
    model, meta = load_compressed(FIXTURES / f"{name}.safetensors")
    with torch.no_grad():
        got = model.eval()(EXPECTED["input"])
    torch.testing.assert_close(got, EXPECTED[name], rtol=0, atol=1e-6)
    assert meta["model"]["name"] == "lenet5"
