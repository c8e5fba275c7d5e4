"""CSR kernels compute what the masked dense layers compute; the break-even sweep reports what it measured."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prunekit.measurement.sparse_kernels import SparseConv2d, SparseLinear, break_even_sparsity, to_sparse_kernels
from prunekit.models import ModelConfig, create_model
from prunekit.planning.constraints import Pattern, SparsityConstraint


def _prune_(module: nn.Module, keep: float = 0.1) -> None:
    with torch.no_grad():
        module.weight.copy_(SparsityConstraint(Pattern.UNSTRUCTURED, keep).project(module.weight)[0])


@pytest.mark.parametrize("conv", [nn.Conv2d(3, 5, 3, padding=1), nn.Conv2d(3, 4, 3, stride=2, padding=2, dilation=2),
                                  nn.Conv2d(2, 6, (3, 1), bias=False)])
def test_sparse_conv_equals_the_masked_dense_conv(conv):
    torch.manual_seed(0)
    _prune_(conv, 0.3)
    x = torch.randn(2, conv.in_channels, 9, 9)
    torch.testing.assert_close(SparseConv2d(conv)(x), conv(x), atol=1e-5, rtol=1e-5)


def test_sparse_linear_handles_token_inputs():
    torch.manual_seed(0)
    layer = nn.Linear(8, 5)
    _prune_(layer, 0.2)
    x = torch.randn(3, 4, 8)
    torch.testing.assert_close(SparseLinear(layer)(x), layer(x), atol=1e-5, rtol=1e-5)


def test_a_pruned_lenet_runs_on_sparse_kernels_with_the_same_outputs():
    torch.manual_seed(0)
    model = create_model(ModelConfig("lenet5", in_channels=1, num_classes=10, input_size=12)).eval()
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            _prune_(m, 0.1)
    sparse = to_sparse_kernels(model)
    assert any(isinstance(m, (SparseLinear, SparseConv2d)) for m in sparse.modules())
    assert not any(type(m) in (nn.Linear, nn.Conv2d) for m in sparse.modules())  # every pruned layer converted
    x = torch.randn(4, 1, 12, 12)
    torch.testing.assert_close(sparse(x), model(x), atol=1e-5, rtol=1e-5)


def test_break_even_reports_the_first_sparsity_where_csr_wins():
    result = break_even_sparsity(32, 64, batch=8, sparsities=(0.5, 0.99), min_run_time=0.01)
    assert len(result.sparse_ms) == 2 and result.dense_ms > 0
    winners = [s for s, ms in zip(result.sparsities, result.sparse_ms) if ms < result.dense_ms]
    assert result.break_even == (winners[0] if winners else None)
