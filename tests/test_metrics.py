"""Measurement against hand-computed examples: parameters, FLOPs (2 x MACs), storage bits, latency, summary."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from prunekit.measurement.metrics import (
    Latency,
    count_flops,
    count_params,
    flops_by_module,
    measure_latency,
    storage_bits,
    summarize,
)


class _ConvNet(nn.Module):
    """conv 3x3 (1 -> 4, no padding) on 8x8 -> 4x6x6 -> flatten 144 -> linear 10."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


CONV_MACS = 4 * 6 * 6 * (1 * 3 * 3)  # output elements x (in_channels x kernel area)
FC_MACS = 144 * 10


def test_count_params_by_hand():
    assert count_params(nn.Linear(5, 3)) == 5 * 3 + 3
    assert count_params(nn.Conv2d(2, 4, 3, bias=False)) == 4 * 2 * 3 * 3
    assert count_params(_ConvNet()) == (4 * 1 * 9 + 4) + (144 * 10 + 10)


def test_count_params_counts_shared_weights_once():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    assert count_params(model) == 4 * 4 + 4


def test_count_params_nonzero_only():
    model = nn.Linear(4, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.0, 1.0, 0.0, 2.0], [3.0, 0.0, 0.0, 0.0]]))
        model.bias.zero_()
    assert count_params(model) == 10
    assert count_params(model, nonzero_only=True) == 3


def test_count_params_ignores_buffers():
    bn = nn.BatchNorm2d(8)  # weight and bias are parameters; running statistics are buffers
    assert count_params(bn) == 16


def test_count_flops_is_twice_the_macs():
    assert count_flops(_ConvNet(), (1, 1, 8, 8)) == 2 * (CONV_MACS + FC_MACS)


def test_count_flops_scales_with_batch_and_keeps_the_mode():
    model = _ConvNet().train()
    assert count_flops(model, (3, 1, 8, 8)) == 3 * 2 * (CONV_MACS + FC_MACS)
    assert model.training


def test_count_flops_of_a_grouped_conv():
    depthwise = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)
    assert count_flops(depthwise, (1, 4, 5, 5)) == 2 * (4 * 5 * 5 * 9)


def test_flops_by_module():
    per_module = flops_by_module(_ConvNet(), (1, 1, 8, 8))
    assert per_module["conv"] == 2 * CONV_MACS and per_module["fc"] == 2 * FC_MACS
    assert per_module[""] == 2 * (CONV_MACS + FC_MACS)  # the whole model


def test_storage_bits_is_dtype_width_times_params():
    model = _ConvNet()
    assert storage_bits(model) == 32 * count_params(model)
    assert storage_bits(model.to(torch.float16)) == 16 * count_params(model)
    assert storage_bits(model.to(torch.float64)) == 64 * count_params(model)


def test_measure_latency_records_its_settings():
    model = _ConvNet().train()
    result = measure_latency(model, (1, 8, 8), batch_size=4, threads=1, min_run_time=0.05)
    assert isinstance(result, Latency)
    assert result.median_ms > 0 and result.iqr_ms >= 0 and result.runs >= 1
    assert (result.batch_size, result.threads) == (4, 1)
    assert model.training
    default = measure_latency(model, (1, 8, 8), min_run_time=0.05)
    assert default.threads == torch.get_num_threads() and default.batch_size == 1


def test_measure_latency_rejects_bad_batch():
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        measure_latency(_ConvNet(), (1, 8, 8), batch_size=0)


def test_summarize_on_synthetic_data(synthetic, make_lenet300):
    model = make_lenet300()
    summary = summarize(model, synthetic, min_run_time=0.05)
    assert summary.params == count_params(model) == (144 * 300 + 300) + (300 * 100 + 100) + (100 * 4 + 4)
    assert summary.flops == 2 * (144 * 300 + 300 * 100 + 100 * 4)
    assert summary.storage_bits == 32 * summary.params
    assert summary.latency_ms_b1 > 0 and summary.latency_ms_b64 > 0
    assert summary.threads == torch.get_num_threads()
    assert 0.0 <= summary.val_acc <= 1.0 and 0.0 <= summary.test_acc <= 1.0
    assert set(summary.to_dict()) == {"params", "flops", "storage_bits", "latency_ms_b1", "latency_ms_b64",
                                      "threads", "val_acc", "test_acc"}


def test_summarize_without_data_or_latency():
    summary = summarize(_ConvNet(), input_shape=(1, 8, 8), latency=False)
    assert summary.flops == 2 * (CONV_MACS + FC_MACS)
    assert math.isnan(summary.latency_ms_b1) and summary.val_acc is None and summary.test_acc is None
    with pytest.raises(ValueError, match="needs data or input_shape"):
        summarize(_ConvNet())
