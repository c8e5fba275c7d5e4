"""Constraint sets of ADMM-NN-S (Ma et al. 2019, arXiv 1907.02124) and their Euclidean projections.

ADMM needs, for every constraint set ``S``, the projection ``Pi_S(V) = argmin_{Z in S} ||Z - V||_F``. Weights are
seen as a matrix ``out x (in*kh*kw)`` (a Linear weight as it is):

* unstructured: at most ``k`` nonzeros -> keep the ``k`` entries of largest magnitude;
* filter: at most ``k`` nonzero rows (output channels) -> keep the rows of largest L2 norm;
* channel: at most ``k`` nonzero input channels (each ``out x kh x kw``) -> keep those of largest L2 norm;
* column (filter shape): at most ``k`` nonzero columns ``(c, i, j)`` shared by all filters -> largest L2 norm;
* k-of-n: in every run of ``n`` consecutive entries of a row exactly ``k`` nonzeros -> the ``k`` largest there.

Quantization keeps the zeros of pruning (the index says where they are) and puts every kept weight on a level:
binary ``{-q, +q}``, ternary ``{-q, 0, +q}``, ``bits=b``: ``{+-q, +-2q, ..., +-Mq}`` with ``M = 2^(b-1)``. The
per-layer ``q`` minimises the squared error: closed form for binary (``mean |w|``) and ternary (best prefix of the
sorted magnitudes), alternating assignment / least-squares refits from several starts for ``b`` bits.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any

import torch

from prunekit.configs import config_from_dict
from prunekit.planning.pattern import Pattern, check_pattern

# the patterns one layer's projection can enforce on its own
LAYER_PATTERNS = (Pattern.UNSTRUCTURED, Pattern.FILTER, Pattern.CHANNEL, Pattern.COLUMN, Pattern.K_OF_N)


@dataclass(frozen=True)
class SparsityConstraint:
    """Keep ``keep`` of a layer's weights in ``pattern`` (for k-of-n: ``k`` of every ``n``).

    Args:
        pattern: :class:`Pattern`.
        keep: Fraction of units kept (entries, rows, input channels or columns), ``0 < keep < 1``; ignored for
            k-of-n, where it is ``k / n``.
        k: Kept entries per run (k-of-n only).
        n: Run length (k-of-n only); must divide the row length of every constrained layer.
    """

    pattern: Pattern = Pattern.UNSTRUCTURED
    keep: float = 0.1
    k: int | None = None
    n: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "pattern", check_pattern(self.pattern, LAYER_PATTERNS + (Pattern.GROUP,),
                                                          "a sparsity constraint"))
        if self.pattern is Pattern.K_OF_N:
            for name in ("k", "n"):
                v = getattr(self, name)
                if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                    raise ValueError(f"k-of-n needs a positive int {name}, got {v!r}")
            if self.k >= self.n:
                raise ValueError(f"k-of-n needs k < n (keep k of every n weights), got k={self.k}, n={self.n}")
            object.__setattr__(self, "keep", self.k / self.n)
        elif self.pattern is Pattern.GROUP:
            raise ValueError("the group pattern spans coupled layers, so it has no per-layer projection; use it "
                             "through prunekit.methods.admm (ADMMConfig(pattern='group'))")
        elif not (isinstance(self.keep, (int, float)) and 0 < self.keep < 1):
            raise ValueError(f"keep must be a fraction in (0, 1) (a pruning rate of 1/keep), got {self.keep!r}")

    def units(self, shape: torch.Size | tuple[int, ...]) -> int:
        """How many units (entries, rows, channels, columns, runs) a weight of ``shape`` has."""
        out, rest = shape[0], math.prod(shape[1:])
        return {Pattern.UNSTRUCTURED: out * rest, Pattern.FILTER: out,
                Pattern.CHANNEL: shape[1] if len(shape) > 1 else 1, Pattern.COLUMN: rest,
                Pattern.K_OF_N: out * rest // (self.n or 1)}[self.pattern]

    def project(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Pi_S(weight), mask)``: the nearest tensor satisfying the constraint and its 0/1 mask."""
        mask = sparsity_mask(weight, self)
        return weight * mask, mask

    def to_dict(self) -> dict[str, Any]:
        return {"pattern": self.pattern.value, "keep": self.keep, "k": self.k, "n": self.n}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SparsityConstraint:
        return config_from_dict(cls, data)


def _keep_count(units: int, keep: float) -> int:
    return max(1, min(units, int(round(units * keep))))


def _top_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask[torch.topk(scores, k, sorted=False).indices] = True
    return mask


def sparsity_mask(weight: torch.Tensor, c: SparsityConstraint) -> torch.Tensor:
    """The 0/1 mask (weight's dtype and shape) of the projection onto ``c``."""
    w = weight.detach()
    if w.dim() < 2:
        raise ValueError(f"sparsity constraints apply to weight matrices and kernels, got shape {tuple(w.shape)}")
    mat = w.reshape(w.shape[0], -1)
    if c.pattern is Pattern.UNSTRUCTURED:
        flat = _top_mask(mat.abs().reshape(-1), _keep_count(mat.numel(), c.keep))
        return flat.reshape(w.shape).to(w.dtype)
    if c.pattern is Pattern.FILTER:
        rows = _top_mask(mat.pow(2).sum(1), _keep_count(mat.shape[0], c.keep))
        return rows[:, None].expand_as(mat).reshape(w.shape).to(w.dtype)
    if c.pattern is Pattern.CHANNEL:
        per_channel = w.pow(2).transpose(0, 1).reshape(w.shape[1], -1).sum(1)
        keep = _top_mask(per_channel, _keep_count(w.shape[1], c.keep))
        shape = [1, w.shape[1]] + [1] * (w.dim() - 2)
        return keep.reshape(shape).expand_as(w).to(w.dtype)
    if c.pattern is Pattern.COLUMN:
        cols = _top_mask(mat.pow(2).sum(0), _keep_count(mat.shape[1], c.keep))
        return cols[None, :].expand_as(mat).reshape(w.shape).to(w.dtype)
    if mat.shape[1] % c.n:
        raise ValueError(f"k-of-n with n={c.n} needs the row length to be a multiple of n; a weight of shape "
                         f"{tuple(w.shape)} has rows of {mat.shape[1]}. Pick n dividing {mat.shape[1]}")
    runs = mat.abs().reshape(-1, c.n)
    idx = torch.topk(runs, c.k, dim=1).indices
    mask = torch.zeros_like(runs, dtype=torch.bool).scatter_(1, idx, True)
    return mask.reshape(w.shape).to(w.dtype)


class QuantKind(str, enum.Enum):
    """Weight levels (zero is reserved for pruned weights)."""

    NONE = "none"
    BINARY = "binary"
    TERNARY = "ternary"
    BITS = "bits"


@dataclass(frozen=True)
class QuantConstraint:
    """Put every kept weight of a layer on a set of levels with one per-layer scale ``q``.

    ``QuantConstraint.parse("bits=3")``, ``"binary"``, ``"ternary"``, ``"none"``.
    """

    kind: QuantKind = QuantKind.NONE
    bits: int | None = None

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "kind", QuantKind(self.kind))
        except ValueError:
            raise ValueError(f"quantization must be one of none, binary, ternary, bits=N; got {self.kind!r}") from None
        if self.kind is QuantKind.BITS:
            if isinstance(self.bits, bool) or not isinstance(self.bits, int) or self.bits < 1:
                raise ValueError(f"bits must be an int >= 1, got {self.bits!r}")
            if self.bits > 16:
                raise ValueError(f"bits must be <= 16 (use none for floating point), got {self.bits}")
        elif self.bits is not None:
            raise ValueError(f"bits is only for kind='bits', got kind={self.kind.value!r} with bits={self.bits!r}")

    @classmethod
    def parse(cls, text: str) -> QuantConstraint:
        kind, sep, value = str(text).strip().lower().partition("=")
        if kind == "bits":
            try:
                bits = int(value)
            except ValueError:
                raise ValueError(f"bits must be an int >= 1, e.g. bits=3; got {text!r}") from None
            return cls(QuantKind.BITS, bits)
        if sep:
            raise ValueError(f"quantization must be none, binary, ternary or bits=N; got {text!r}")
        return cls(kind)

    def __str__(self) -> str:
        return f"bits={self.bits}" if self.kind is QuantKind.BITS else self.kind.value

    def to_text(self) -> str:
        """The text form (``QuantConstraint.parse(q.to_text()) == q``)."""
        return str(self)

    @property
    def code_bits(self) -> int | None:
        """Bits per kept weight (the sign included); ``None`` for unquantized."""
        return {QuantKind.NONE: None, QuantKind.BINARY: 1, QuantKind.TERNARY: 2,
                QuantKind.BITS: self.bits}[self.kind]

    def project(self, weight: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
        """``(quantized, q)``: the nearest weight on the levels (pruned entries stay 0) and its scale."""
        if self.kind is QuantKind.NONE:
            return weight if mask is None else weight * mask, 1.0
        w = weight.detach().double()
        kept = torch.ones_like(w, dtype=torch.bool) if mask is None else mask.bool()
        values = w[kept]
        if values.numel() == 0:
            return torch.zeros_like(weight), 1.0
        if self.kind is QuantKind.TERNARY:
            q, levels = _ternary(values)
        else:
            q, levels = _symmetric_levels(values, 1 if self.kind is QuantKind.BINARY else 2 ** (self.bits - 1))
        out = torch.zeros_like(w)
        out[kept] = q * levels
        return out.to(weight.dtype), float(q)


def _ternary(values: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Best ``{-q, 0, +q}``: keep the t largest magnitudes at ``q = mean of them``; t minimises the error."""
    mags, order = values.abs().sort(descending=True)
    prefix = mags.cumsum(0)
    t = torch.arange(1, len(mags) + 1, dtype=mags.dtype)
    # error(t) = sum w^2 - (sum_{top t} |w|)^2 / t
    best = int(torch.argmax(prefix.pow(2) / t)) + 1
    q = float(prefix[best - 1] / best)
    levels = torch.zeros_like(values)
    chosen = order[:best]
    levels[chosen] = values[chosen].sign()
    return q, levels


def _assign(values: torch.Tensor, q: float, m: int) -> torch.Tensor:
    return values.sign() * (values.abs() / q).round().clamp(1, m)


def _symmetric_levels(values: torch.Tensor, m: int) -> tuple[float, torch.Tensor]:
    """Best ``q`` for levels ``{+-1, ..., +-m} * q``: alternate assignment and the least-squares ``q`` from
    several starting scales; keep the lowest error."""
    if m == 1:
        return float(values.abs().mean()), values.sign()
    mags = values.abs()
    best_q, best_err = None, math.inf
    for frac in (0.25, 0.5, 0.75, 1.0):
        q = float(mags.max()) * frac / m if float(mags.max()) > 0 else 1.0
        for _ in range(30):
            levels = _assign(values, q, m)
            new_q = float((values * levels).sum() / levels.pow(2).sum())
            if abs(new_q - q) <= 1e-12 * max(1.0, abs(q)):
                break
            q = new_q
        err = float((values - q * _assign(values, q, m)).pow(2).sum())
        if err < best_err:
            best_q, best_err = q, err
    return best_q, _assign(values, best_q, m)
