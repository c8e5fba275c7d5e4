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


def test_a_release_dpp_8bit_checkpoint_is_costed_at_8_bits():
    """0.1 recorded DPP's quantization but not its steps; the storage count finds them from the weights instead of
    costing the codes as float32 (what ``compare`` did in 0.1)."""
    from prunekit.measurement.formats import encoding_storage, infer_scale

    model, meta = load_compressed(FIXTURES / "dpp-8bit.safetensors")
    assert meta["encoding"] == {"quant": "bits=8"}
    storage = encoding_storage(model, meta["encoding"])
    assert storage["values"] == "8-bit codes"
    as_float = encoding_storage(model, {"quant": "none"})
    # the layers DPP constrained (n=5 divides their rows; fc1's 108 does not, so it stayed float) as 8-bit codes
    # with one float32 step each; the rest as float32
    coded = [model.get_submodule(n).weight.numel() for n in ("conv1", "conv2", "fc2")]
    assert storage["bits"]["dense"] == as_float["bits"]["dense"] - 24 * sum(coded) + 32 * len(coded)
    assert infer_scale(torch.tensor([0.3, 0.1, -0.2]), 8) == pytest.approx(0.1)
    assert infer_scale(torch.tensor([0.3, 0.1234567]), 2) is None


def test_a_release_admm_checkpoint_keeps_its_recorded_encoding():
    _, meta = load_compressed(FIXTURES / "admm-4bit.safetensors")
    assert meta["encoding"]["quant"] == "bits=4" and set(meta["encoding"]["scales"]) == \
        set(meta["encoding"]["masked_layers"])
