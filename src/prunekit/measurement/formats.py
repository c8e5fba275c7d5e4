"""Compressed weight formats with exact storage counts and lossless decoding.

ADMM-NN-S (Ma et al. 2019, arXiv 1907.02124) argues that non-structured pruning must be charged for its indices:
a fair comparison counts every bit a deployed model stores. Each format here encodes a (pruned, possibly
quantized) weight tensor, reports its size in bits (values + indices + scales + shape-independent headers are not
counted) and decodes back to exactly the same dense tensor:

* ``dense``: every entry, 32 or 16 bits;
* ``csr``: nonzero values, a column index of ``ceil(log2 cols)`` bits each, row pointers of
  ``ceil(log2 (nnz + 1))`` bits (``rows + 1`` of them);
* ``relative``: Deep Compression's relative indexing (Han et al. 2016, arXiv 1510.00149): each nonzero stores the
  gap to the previous one in ``index_bits``; a gap that does not fit is bridged by padding entries (a stored zero);
* ``bitmap``: one bit per entry plus the nonzero values;
* ``k-of-n``: exactly ``k`` kept in every run of ``n``: ``k`` positions of ``ceil(log2 n)`` bits per run, no other
  index (DPP's and N:M hardware layout);
* ``structured``: rows (filters) or columns removed physically: the smaller dense matrix plus the kept column
  indices for column pruning (a gathered im2col GEMM needs them; removed filters and channels need none).

Values are float32/float16, or, for quantized weights, integer codes of ``code_bits`` bits with one float32 scale
per tensor (:func:`value_codec`).

A model's storage (:func:`format_storage`) is counted in each format for all its layers, and ``per-layer``: each
layer in its own smallest format, relative indexing at the gap width that suits the layer (2 to 12 bits), plus the
bits that record each layer's choice (as Deep Compression stores convolutions and fully connected layers with
different gap widths).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


def index_bits(count: int) -> int:
    """Bits of an index that takes ``count`` distinct values (at least 1)."""
    return max(1, math.ceil(math.log2(max(count, 2))))


@dataclass(frozen=True)
class ValueCodec:
    """How one stored value is represented: ``float32``, ``float16`` or ``code_bits``-bit codes times a scale."""

    name: str
    bits: int
    scale: float | None = None  # codes only

    @property
    def overhead_bits(self) -> int:
        return 32 if self.scale is not None else 0

    def encode(self, values: torch.Tensor) -> torch.Tensor:
        if self.scale is None:
            return values.to(torch.float16 if self.bits == 16 else torch.float32)
        return torch.round(values.double() / self.scale).to(torch.int32)

    def decode(self, stored: torch.Tensor) -> torch.Tensor:
        return stored.double() * self.scale if self.scale is not None else stored.double()


def _grid_tolerance(levels: torch.Tensor) -> torch.Tensor:
    """How far float32-stored multiples ``k * q`` may sit from integer ``k``: rounding grows with ``k`` (a 16-bit
    code reaches 32768)."""
    return 1e-4 + 4e-7 * levels.abs()


def value_codec(weight: torch.Tensor, code_bits: int | None = None, scale: float | None = None,
                float_bits: int = 32) -> ValueCodec:
    """The codec for ``weight``: codes of ``code_bits`` with ``scale`` (quantized weights), else floats.

    Raises:
        ValueError: a kept weight is not an integer multiple of ``scale`` within the code range.
    """
    if code_bits is None:
        if float_bits not in (16, 32):
            raise ValueError(f"float values are 16 or 32 bits, got {float_bits}")
        return ValueCodec(f"float{float_bits}", float_bits)
    if scale is None or not scale > 0:
        raise ValueError(f"quantized values need a positive scale, got {scale!r}")
    nz = weight[weight != 0].double()
    levels = nz / scale
    if len(nz) and ((levels - levels.round()).abs() > _grid_tolerance(levels)).any():
        raise ValueError("the weights are not multiples of the given scale; quantize them first "
                         "(prunekit.planning.constraints.QuantConstraint.project)")
    top = 2 ** (code_bits - 1) if code_bits > 1 else 1
    if len(nz) and levels.round().abs().max() > top:
        raise ValueError(f"a level exceeds the {code_bits}-bit range (+-{top})")
    return ValueCodec(f"{code_bits}-bit codes", code_bits, float(scale))


@dataclass
class Encoded:
    """An encoded tensor: the arrays a deployment would store, their exact size and a lossless decoder."""

    format: str
    shape: tuple[int, ...]
    codec: ValueCodec
    arrays: dict[str, torch.Tensor]
    bits_by_part: dict[str, int] = field(default_factory=dict)

    @property
    def bits(self) -> int:
        return sum(self.bits_by_part.values())

    def decode(self) -> torch.Tensor:
        return _DECODERS[self.format](self)


def _matrix(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().reshape(weight.shape[0], -1) if weight.dim() > 1 else weight.detach().reshape(1, -1)


def _values_bits(codec: ValueCodec, count: int) -> dict[str, int]:
    return {"values": count * codec.bits, "scale": codec.overhead_bits}


def encode_dense(weight: torch.Tensor, codec: ValueCodec) -> Encoded:
    flat = weight.detach().reshape(-1)
    return Encoded("dense", tuple(weight.shape), codec, {"values": codec.encode(flat)},
                   _values_bits(codec, flat.numel()))


def encode_csr(weight: torch.Tensor, codec: ValueCodec) -> Encoded:
    m = _matrix(weight)
    rows, cols = m.nonzero(as_tuple=True)
    counts = torch.bincount(rows, minlength=m.shape[0])
    pointers = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    nnz = len(cols)
    return Encoded("csr", tuple(weight.shape), codec,
                   {"values": codec.encode(m[rows, cols]), "columns": cols, "row_pointers": pointers},
                   {**_values_bits(codec, nnz), "columns": nnz * index_bits(m.shape[1]),
                    "row_pointers": (m.shape[0] + 1) * index_bits(nnz + 1)})


def encode_relative(weight: torch.Tensor, codec: ValueCodec, gap_bits: int = 4) -> Encoded:
    """Deep Compression's relative indexing: gaps of at most ``2^gap_bits - 1``, padding zeros in between."""
    if gap_bits < 1:
        raise ValueError(f"gap_bits must be >= 1, got {gap_bits}")
    flat = weight.detach().reshape(-1)
    positions = flat.nonzero().reshape(-1).tolist()
    max_gap = 2 ** gap_bits - 1
    gaps, values, prev = [], [], -1
    for p in positions:
        gap = p - prev
        while gap > max_gap:  # a padding entry: stored value 0 at prev + max_gap
            gaps.append(max_gap)
            values.append(0.0)
            prev += max_gap
            gap = p - prev
        gaps.append(gap)
        values.append(float(flat[p]))
        prev = p
    stored = torch.tensor(values, dtype=torch.float64)
    return Encoded("relative", tuple(weight.shape), codec,
                   {"values": codec.encode(stored), "gaps": torch.tensor(gaps, dtype=torch.long)},
                   {**_values_bits(codec, len(values)), "gaps": len(gaps) * gap_bits})


def encode_bitmap(weight: torch.Tensor, codec: ValueCodec) -> Encoded:
    flat = weight.detach().reshape(-1)
    bitmap = flat != 0
    return Encoded("bitmap", tuple(weight.shape), codec, {"values": codec.encode(flat[bitmap]), "bitmap": bitmap},
                   {**_values_bits(codec, int(bitmap.sum())), "bitmap": flat.numel()})


def encode_k_of_n(weight: torch.Tensor, codec: ValueCodec, k: int, n: int) -> Encoded:
    """Exactly ``k`` kept in every run of ``n`` consecutive entries of a row (fewer nonzeros: explicit zeros)."""
    m = _matrix(weight)
    if m.shape[1] % n:
        raise ValueError(f"k-of-n storage needs n={n} to divide the row length {m.shape[1]}")
    runs = m.reshape(-1, n)
    if int((runs != 0).sum(1).max()) > k:
        raise ValueError(f"some run of {n} has more than k={k} nonzeros; the weight is not {k}-of-{n} sparse")
    # the k largest magnitudes of each run (its nonzeros first), positions sorted
    positions = torch.topk(runs.abs(), k, dim=1).indices.sort(1).values
    values = runs.gather(1, positions)
    return Encoded("k-of-n", tuple(weight.shape), codec,
                   {"values": codec.encode(values.reshape(-1)), "positions": positions, "n": torch.tensor(n)},
                   {**_values_bits(codec, values.numel()), "positions": values.numel() * index_bits(n)})


def encode_structured(weight: torch.Tensor, codec: ValueCodec) -> Encoded:
    """Rows that are all zero removed (filters, gone physically: no index), and columns that are all zero removed
    with their kept indices stored (a column-pruned layer gathers its im2col columns)."""
    m = _matrix(weight)
    rows = (m != 0).any(1).nonzero().reshape(-1)
    cols = (m != 0).any(0).nonzero().reshape(-1)
    small = m[rows][:, cols]
    col_index = 0 if len(cols) == m.shape[1] else len(cols) * index_bits(m.shape[1])
    return Encoded("structured", tuple(weight.shape), codec,
                   {"values": codec.encode(small.reshape(-1)), "rows": rows, "columns": cols},
                   {**_values_bits(codec, small.numel()), "columns": col_index})


def _decode_dense(e: Encoded) -> torch.Tensor:
    return e.codec.decode(e.arrays["values"]).reshape(e.shape)


def _decode_csr(e: Encoded) -> torch.Tensor:
    rows_n = e.shape[0] if len(e.shape) > 1 else 1
    m = torch.zeros(rows_n, math.prod(e.shape) // rows_n, dtype=torch.float64)
    counts = e.arrays["row_pointers"].diff()
    rows = torch.repeat_interleave(torch.arange(rows_n), counts)
    m[rows, e.arrays["columns"]] = e.codec.decode(e.arrays["values"])
    return m.reshape(e.shape)


def _decode_relative(e: Encoded) -> torch.Tensor:
    flat = torch.zeros(math.prod(e.shape), dtype=torch.float64)
    positions = e.arrays["gaps"].cumsum(0) - 1
    flat[positions] = e.codec.decode(e.arrays["values"])
    return flat.reshape(e.shape)


def _decode_bitmap(e: Encoded) -> torch.Tensor:
    flat = torch.zeros(math.prod(e.shape), dtype=torch.float64)
    flat[e.arrays["bitmap"]] = e.codec.decode(e.arrays["values"])
    return flat.reshape(e.shape)


def _decode_k_of_n(e: Encoded) -> torch.Tensor:
    n = int(e.arrays["n"])
    positions = e.arrays["positions"]
    runs = torch.zeros(positions.shape[0], n, dtype=torch.float64)
    runs.scatter_(1, positions, e.codec.decode(e.arrays["values"]).reshape(positions.shape))
    return runs.reshape(e.shape)


def _decode_structured(e: Encoded) -> torch.Tensor:
    rows_n = e.shape[0] if len(e.shape) > 1 else 1
    m = torch.zeros(rows_n, math.prod(e.shape) // rows_n, dtype=torch.float64)
    rows, cols = e.arrays["rows"], e.arrays["columns"]
    m[rows[:, None], cols[None, :]] = e.codec.decode(e.arrays["values"]).reshape(len(rows), len(cols))
    return m.reshape(e.shape)


_DECODERS = {"dense": _decode_dense, "csr": _decode_csr, "relative": _decode_relative, "bitmap": _decode_bitmap,
             "k-of-n": _decode_k_of_n, "structured": _decode_structured}
FORMATS = tuple(_DECODERS)


def encode(weight: torch.Tensor, fmt: str, codec: ValueCodec, **options) -> Encoded:
    """Encode ``weight`` in format ``fmt`` (one of :data:`FORMATS`)."""
    encoders = {"dense": encode_dense, "csr": encode_csr, "relative": encode_relative, "bitmap": encode_bitmap,
                "k-of-n": encode_k_of_n, "structured": encode_structured}
    if fmt not in encoders:
        raise ValueError(f"unknown storage format {fmt!r}; known: {', '.join(FORMATS)}")
    return encoders[fmt](weight, codec, **options)


PER_LAYER_GAP_BITS = tuple(range(2, 13))  # relative-indexing gap widths the per-layer format may choose


def relative_bits(weight: torch.Tensor, codec: ValueCodec, gap_bits: int) -> int:
    """What :func:`encode_relative` stores, counted without encoding: a gap ``d`` takes ``ceil(d / (2^b - 1))``
    entries (the last one the nonzero, the others padding)."""
    positions = weight.detach().reshape(-1).nonzero().reshape(-1)
    gaps = torch.diff(positions, prepend=positions.new_tensor([-1]))
    entries = int(torch.div(gaps + 2 ** gap_bits - 2, 2 ** gap_bits - 1, rounding_mode="floor").sum())
    return entries * (codec.bits + gap_bits) + codec.overhead_bits


def format_storage(model: nn.Module, layers: list[str], code_bits: int | dict[str, int] | None = None,
                   scales: dict[str, float] | None = None,
                   k_of_n: tuple[int, int] | dict[str, tuple[int, int]] | None = None,
                   gap_bits: int = 5, dense_bits: int | None = None) -> dict[str, Any]:
    """Exact storage of ``model`` with the weights of ``layers`` in each format of this module.

    ``k_of_n`` adds the fixed-k format: one ``(k, n)`` for every layer, or one per layer.

    Those weights are stored as float32 values, or as ``code_bits`` codes (one width for all, or one per layer: mixed
    precision) with one float32 scale per layer (``scales``); every other parameter (biases, norms, other layers) as
    dense float32. Returns total bits per format (``per-layer``: every layer in its own smallest format), the dense
    float32 size (``dense_bits``: the unpruned model's, when channels were removed physically; default ``model``'s
    own) and the compression ratio of each format.
    """
    modules = dict(model.named_modules())
    formats = ["dense", "csr", "relative", "bitmap", "structured"] + (["k-of-n"] if k_of_n else [])
    constrained = {f"{n}.weight" for n in layers}
    other_bits = sum(32 * p.numel() for name, p in model.named_parameters() if name not in constrained)
    totals = dict.fromkeys([*formats, "per-layer"], other_bits)
    choice_bits = index_bits(len(formats)) + index_bits(len(PER_LAYER_GAP_BITS))  # per layer: format, gap width
    for name in layers:
        w = modules[name].weight.detach().cpu()
        bits = code_bits.get(name) if isinstance(code_bits, dict) else code_bits
        codec = value_codec(w, bits, (scales or {}).get(name)) if bits else value_codec(w)
        k, n = (k_of_n[name] if isinstance(k_of_n, dict) else k_of_n) if k_of_n else (None, None)
        layer = {}
        for fmt in formats:
            options = {"gap_bits": gap_bits} if fmt == "relative" else ({"k": k, "n": n} if fmt == "k-of-n" else {})
            layer[fmt] = encode(w, fmt, codec, **options).bits
            totals[fmt] += layer[fmt]
        smallest = min(*layer.values(), *(relative_bits(w, codec, g) for g in PER_LAYER_GAP_BITS))
        totals["per-layer"] += smallest + choice_bits
    dense_bits = dense_bits or sum(32 * p.numel() for p in model.parameters())
    return {"dense_float32_bits": dense_bits, "bits": totals,
            "compression": {f: dense_bits / b for f, b in totals.items()},
            "best": min(totals, key=totals.get), "relative_gap_bits": gap_bits,
            "values": _values_label(code_bits)}


def _values_label(code_bits: int | dict[str, int] | None) -> str:
    if isinstance(code_bits, dict):
        return f"{min(code_bits.values())}-{max(code_bits.values())}-bit codes per layer" if code_bits else "float32"
    return f"{code_bits}-bit codes" if code_bits else "float32"


def encoding_storage(model: nn.Module, encoding: dict[str, Any], dense_bits: int | None = None,
                     gap_bits: int = 5) -> dict[str, Any]:
    """:func:`format_storage` of a model as a method's record describes its weights: ``encoding["masked_layers"]``
    (the layers whose zeros the formats may skip; default every Conv2d/Linear layer), ``quant`` (e.g. ``bits=4``),
    or ``layer_bits`` (layer -> code width: mixed precision), ``scales`` (layer -> step) and ``k_of_n``
    (layer -> [k, n])."""
    from prunekit.planning.constraints import QuantConstraint

    layers = list(encoding.get("masked_layers") or []) if encoding.get("masked_layers") is not None else \
        [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    code_bits = QuantConstraint.parse(encoding.get("quant", "none")).code_bits
    scales = dict(encoding.get("scales") or {})
    if code_bits:  # files that did not record a layer's step (DPP in 0.1): find it from the weights
        modules = dict(model.named_modules())
        for name in list(layers):
            if name not in scales:
                step = infer_scale(modules[name].weight.detach(), code_bits)
                if step is None:  # not on a grid (a layer the method left alone): dense float32, never too small
                    layers.remove(name)
                else:
                    scales[name] = step
    k_of_n = {name: tuple(kn) for name, kn in (encoding.get("k_of_n") or {}).items()} or None
    if encoding.get("layer_bits"):
        per_layer = {name: int(b) for name, b in encoding["layer_bits"].items()}
        return format_storage(model, list(layers), per_layer, scales, k_of_n, gap_bits, dense_bits)
    return format_storage(model, list(layers), code_bits, scales if code_bits else None, k_of_n, gap_bits,
                          dense_bits)


def infer_scale(weight: torch.Tensor, code_bits: int) -> float | None:
    """The step ``q`` of a quantized weight (every nonzero entry an integer multiple of ``q`` within the
    ``code_bits`` range), tried as the smallest magnitude divided by 1, 2, ...; ``None`` when no step fits."""
    nz = weight[weight != 0].double().abs()
    if not len(nz):
        return 1.0
    top = 2 ** (code_bits - 1) if code_bits > 1 else 1
    smallest = float(nz.min())
    for divisor in range(1, top + 1):
        q = smallest / divisor
        levels = nz / q
        if not ((levels - levels.round()).abs() > _grid_tolerance(levels)).any() and levels.round().max() <= top:
            return q
    return None
