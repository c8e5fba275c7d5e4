"""Compressed formats: exact bit counts on hand-computed examples, lossless decoding on random sparse tensors."""

from __future__ import annotations

import pytest
import torch

from prunekit.measurement.formats import FORMATS, encode, index_bits, value_codec
from prunekit.planning.constraints import QuantConstraint, SparsityConstraint
from prunekit.planning.pattern import Pattern


def _example() -> torch.Tensor:
    w = torch.zeros(2, 8)
    w[0, 0], w[1, 1], w[1, 2] = 1.5, -2.0, 0.25  # flat positions 0, 9, 10
    return w


def test_bit_counts_match_a_hand_computed_example():
    w, f32 = _example(), value_codec(_example())
    assert encode(w, "dense", f32).bits == 16 * 32
    # 3 values, 3 column indices of 3 bits (8 columns), 3 row pointers of 2 bits (values 0..3)
    assert encode(w, "csr", f32).bits == 3 * 32 + 3 * 3 + 3 * 2
    # gaps 1, 9, 1 with 2-bit gaps (max 3): 9 = 3 + 3 + 3 needs two padding entries -> 5 entries
    rel = encode(w, "relative", f32, gap_bits=2)
    assert rel.arrays["gaps"].tolist() == [1, 3, 3, 3, 1] and rel.bits == 5 * 32 + 5 * 2
    assert encode(w, "bitmap", f32).bits == 16 + 3 * 32
    # 2-of-4 runs (4 runs): two 2-bit positions and two values per run (explicit zeros where fewer are nonzero)
    assert encode(w, "k-of-n", f32, k=2, n=4).bits == 4 * 2 * (32 + 2)
    # structured: both rows have nonzeros, columns 0, 1, 2 kept -> a 2x3 matrix plus 3 column indices of 3 bits
    assert encode(w, "structured", f32).bits == 6 * 32 + 3 * 3


def test_quantized_values_cost_their_code_bits_plus_one_scale():
    w = torch.tensor([[0.0, 0.3, -0.6, 0.0], [0.9, 0.0, 0.0, -0.3]])
    codec = value_codec(w, code_bits=3, scale=0.3)
    enc = encode(w, "csr", codec)
    assert enc.bits_by_part["values"] == 4 * 3 and enc.bits_by_part["scale"] == 32
    torch.testing.assert_close(enc.decode(), w.double())


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("seed", [0, 1])
def test_every_format_decodes_losslessly(fmt, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 4, 3, 3, generator=g)
    constraint = SparsityConstraint(Pattern.K_OF_N, k=2, n=9) if fmt == "k-of-n" else (
        SparsityConstraint(Pattern.FILTER, keep=0.5) if fmt == "structured" else
        SparsityConstraint(Pattern.UNSTRUCTURED, keep=0.1))
    sparse, mask = constraint.project(w)
    options = {"k": 2, "n": 9} if fmt == "k-of-n" else {}
    assert torch.equal(encode(sparse, fmt, value_codec(sparse), **options).decode(), sparse.double())
    q_w, q = QuantConstraint.parse("bits=3").project(sparse, mask)
    enc = encode(q_w, fmt, value_codec(q_w, 3, q), **options)
    torch.testing.assert_close(enc.decode(), q_w.double(), rtol=0, atol=1e-6)
    half = encode(sparse, fmt, value_codec(sparse, float_bits=16), **options)
    assert torch.equal(half.decode(), sparse.half().double())


def test_relative_indexing_pads_long_gaps_and_still_decodes():
    w = torch.zeros(100)
    w[[0, 50, 99]] = torch.tensor([1.0, 2.0, 3.0])
    enc = encode(w, "relative", value_codec(w), gap_bits=3)
    assert (enc.arrays["gaps"] <= 7).all() and len(enc.arrays["gaps"]) > 3
    assert torch.equal(enc.decode(), w.double())


def test_errors_are_clear():
    w = _example()
    with pytest.raises(ValueError, match="unknown storage format 'zip'"):
        encode(w, "zip", value_codec(w))
    with pytest.raises(ValueError, match="more than k=1 nonzeros"):
        encode(torch.ones(1, 4), "k-of-n", value_codec(w), k=1, n=4)
    with pytest.raises(ValueError, match="quantize them first"):
        value_codec(w, code_bits=2, scale=0.7)
    with pytest.raises(ValueError, match="positive scale"):
        value_codec(w, code_bits=2)
    assert index_bits(1) == 1 and index_bits(8) == 3 and index_bits(9) == 4


@pytest.mark.parametrize("density", [0.002, 0.05, 0.5, 1.0])
def test_relative_bits_counts_what_the_encoder_stores(density):
    from prunekit.measurement.formats import relative_bits

    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 300, generator=g) * (torch.rand(40, 300, generator=g) < density)
    for gap_bits in (2, 5, 9):
        assert relative_bits(w, value_codec(w), gap_bits) == encode(w, "relative", value_codec(w),
                                                                     gap_bits=gap_bits).bits


def test_per_layer_storage_takes_each_layers_smallest_format():
    """A dense small layer and a very sparse large one: one format for both pays indices on the dense layer or a
    bitmap on the sparse one; per layer, each is stored its own way (plus the bits recording the choice)."""
    from torch import nn

    from prunekit.measurement.formats import PER_LAYER_GAP_BITS, format_storage, relative_bits

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8, bias=False), nn.Linear(8, 2000, bias=False))
    with torch.no_grad():
        model[1].weight.mul_(torch.rand(2000, 8) < 0.01)
    report = format_storage(model, ["0", "1"])
    w0, w1 = model[0].weight, model[1].weight
    formats = ["dense", "csr", "relative", "bitmap", "structured"]

    def smallest(w):
        return min([encode(w, f, value_codec(w), **({"gap_bits": 5} if f == "relative" else {})).bits
                    for f in formats] + [relative_bits(w, value_codec(w), b) for b in PER_LAYER_GAP_BITS])

    choice = index_bits(len(formats)) + index_bits(len(PER_LAYER_GAP_BITS))
    assert report["bits"]["per-layer"] == smallest(w0) + smallest(w1) + 2 * choice
    assert report["best"] == "per-layer" and report["bits"]["per-layer"] < min(
        v for k, v in report["bits"].items() if k != "per-layer")
