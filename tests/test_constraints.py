"""Every ADMM projection against brute force on small tensors: no tensor in the set is closer."""

from __future__ import annotations

import itertools

import pytest
import torch

from prunekit.planning.constraints import QuantConstraint, QuantKind, SparsityConstraint, sparsity_mask
from prunekit.planning.pattern import Pattern


def _brute_units(w: torch.Tensor, groups: list[torch.Tensor], k: int) -> float:
    """min ||Z - w|| over Z keeping exactly k of the given index groups (boolean masks) and zeroing the rest."""
    best = float("inf")
    for chosen in itertools.combinations(range(len(groups)), k):
        keep = torch.zeros_like(w, dtype=torch.bool)
        for i in chosen:
            keep |= groups[i]
        best = min(best, float((w * ~keep).pow(2).sum()))
    return best


def _groups(shape, pattern):
    w = torch.zeros(shape)
    mat = w.reshape(shape[0], -1)
    if pattern is Pattern.UNSTRUCTURED:
        return [torch.nn.functional.one_hot(torch.tensor(i), w.numel()).bool().reshape(shape) for i in range(w.numel())]
    if pattern is Pattern.FILTER:
        out = []
        for r in range(shape[0]):
            m = torch.zeros_like(mat, dtype=torch.bool)
            m[r] = True
            out.append(m.reshape(shape))
        return out
    if pattern is Pattern.CHANNEL:
        out = []
        for c in range(shape[1]):
            m = torch.zeros(shape, dtype=torch.bool)
            m[:, c] = True
            out.append(m)
        return out
    out = []
    for col in range(mat.shape[1]):
        m = torch.zeros_like(mat, dtype=torch.bool)
        m[:, col] = True
        out.append(m.reshape(shape))
    return out


@pytest.mark.parametrize("pattern", [Pattern.UNSTRUCTURED, Pattern.FILTER, Pattern.CHANNEL, Pattern.COLUMN])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sparsity_projection_is_the_nearest_point_of_the_set(pattern, seed):
    shape = (3, 2, 2, 1) if pattern is not Pattern.UNSTRUCTURED else (3, 3)
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    c = SparsityConstraint(pattern, keep=0.4)
    projected, mask = c.project(w)
    groups = _groups(shape, pattern)
    k = max(1, round(len(groups) * 0.4))
    assert float((w - projected).pow(2).sum()) == pytest.approx(_brute_units(w, groups, k), rel=1e-12, abs=1e-12)
    assert torch.equal(projected, w * mask) and set(mask.unique().tolist()) <= {0.0, 1.0}


def test_k_of_n_keeps_exactly_k_in_every_run_and_is_nearest():
    w = torch.randn(4, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    projected, mask = SparsityConstraint(Pattern.K_OF_N, k=2, n=4).project(w)
    runs = mask.reshape(-1, 4)
    assert (runs.sum(1) == 2).all()
    for run, m in zip(w.reshape(-1, 4), runs):
        best = min(float(run[[i for i in range(4) if i not in keep]].pow(2).sum())
                   for keep in itertools.combinations(range(4), 2))
        assert float((run * (1 - m)).pow(2).sum()) == pytest.approx(best)


def test_conv_kernels_are_seen_as_out_by_in_times_kernel():
    w = torch.zeros(2, 3, 2, 2)
    w[:, 1] = 5.0  # input channel 1 is the largest channel and holds the largest columns
    assert sparsity_mask(w, SparsityConstraint(Pattern.CHANNEL, keep=0.34))[:, 1].all()
    col = sparsity_mask(w, SparsityConstraint(Pattern.COLUMN, keep=0.3)).reshape(2, -1)
    assert col[:, 4:8].all() and col.sum() == 8  # the 4 columns (c=1, i, j), in every filter


def _brute_levels(values: torch.Tensor, m: int, zero_allowed: bool) -> float:
    """min over a fine grid of q of the error with each value on its nearest allowed level."""
    best = float("inf")
    top = float(values.abs().max())
    for q in torch.linspace(top / (4 * m), 2 * top, 20001, dtype=torch.float64):
        levels = torch.arange(-m, m + 1, dtype=torch.float64)
        if not zero_allowed:
            levels = levels[levels != 0]
        err = (values[:, None] - q * levels[None, :]).pow(2).min(1).values.sum()
        best = min(best, float(err))
    return best


@pytest.mark.parametrize("bits", [1, 2, 3])
@pytest.mark.parametrize("seed", [0, 1])
def test_k_bit_projection_is_as_good_as_a_fine_grid_search(bits, seed):
    w = torch.randn(40, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q_w, q = QuantConstraint(QuantKind.BITS, bits).project(w)
    m = 2 ** (bits - 1)
    assert float((w - q_w).pow(2).sum()) <= _brute_levels(w, m, zero_allowed=False) * (1 + 1e-6)
    levels = (q_w / q).round()
    assert torch.allclose(q_w, q * levels) and (levels.abs() >= 1).all() and (levels.abs() <= m).all()


def test_binary_is_sign_times_mean_magnitude_and_keeps_pruned_zeros():
    w = torch.tensor([0.5, -1.5, 0.0, 2.0, -0.1], dtype=torch.float64)
    mask = torch.tensor([1, 1, 0, 1, 1], dtype=torch.float64)
    q_w, q = QuantConstraint.parse("binary").project(w, mask)
    assert q == pytest.approx((0.5 + 1.5 + 2.0 + 0.1) / 4)
    assert q_w.tolist() == pytest.approx([q, -q, 0.0, q, -q])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ternary_is_the_exact_minimiser(seed):
    w = torch.randn(8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q_w, _ = QuantConstraint.parse("ternary").project(w)
    best = float("inf")
    for size in range(1, 9):
        for subset in itertools.combinations(range(8), size):
            s = list(subset)
            q = float(w[s].abs().mean())
            z = torch.zeros_like(w)
            z[s] = q * w[s].sign()
            best = min(best, float((w - z).pow(2).sum()))
    assert float((w - q_w).pow(2).sum()) == pytest.approx(best, rel=1e-12)


@pytest.mark.parametrize("kwargs, match", [
    ({"pattern": "rows"}, "pattern must be one of"),
    ({"keep": 1.0}, "keep must be a fraction"),
    ({"keep": 0}, "keep must be a fraction"),
    ({"pattern": "k-of-n", "k": 5, "n": 4}, "k < n"),
    ({"pattern": "k-of-n", "k": 2}, "positive int n"),
])
def test_sparsity_constraint_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparsityConstraint(**kwargs)


def test_k_of_n_with_n_not_dividing_the_row_is_a_clear_error():
    with pytest.raises(ValueError, match="Pick n dividing 6"):
        SparsityConstraint(Pattern.K_OF_N, k=1, n=4).project(torch.randn(2, 6))


@pytest.mark.parametrize("text, match", [("bits=0", "bits must be an int >= 1"), ("bits=x", "bits must be an int"),
                                         ("octal", "quantization must be one of"), ("binary=2", "must be none")])
def test_quant_parse_errors(text, match):
    with pytest.raises(ValueError, match=match):
        QuantConstraint.parse(text)


def test_configs_round_trip():
    c = SparsityConstraint(Pattern.K_OF_N, k=2, n=8)
    assert SparsityConstraint.from_dict(c.to_dict()) == c
    assert str(QuantConstraint.parse("bits=3")) == "bits=3" and QuantConstraint.parse("bits=3").code_bits == 3
