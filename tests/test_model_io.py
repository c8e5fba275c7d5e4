"""Models with several inputs and outputs in the channel engine: example inputs as a tensor, a tuple or a dict of
keyword arguments; outputs of any nesting compared leaf by leaf (shrinking still equals masking to 1e-5)."""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from architectures import random_plan
from prunekit.channels.graph import ChannelGraph, find_output_layers
from prunekit.channels.model_io import call_model, output_difference, output_leaves, outputs_match


class SplitHeads(nn.Module):
    """A stem whose channels are split in two branches, returned as a tuple (as Torch-Pruning's test_split)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.left = nn.Conv2d(4, 6, 3, padding=1)
        self.right = nn.Conv2d(4, 6, 1)
        self.head_a = nn.Linear(6, 5)
        self.head_b = nn.Linear(6, 3)

    def forward(self, x):
        a, b = torch.split(torch.relu(self.bn(self.stem(x))), [4, 4], dim=1)
        a = torch.relu(self.left(a)).mean((2, 3))
        b = torch.relu(self.right(b)).mean((2, 3))
        return self.head_a(a), self.head_b(b)


@dataclass
class TwoOutputs:
    scores: torch.Tensor
    extras: dict


class TwoInputs(nn.Module):
    """Two inputs by keyword (as Torch-Pruning's test_multiple_inputs_and_outputs), fused, with a nested output:
    a dataclass holding a tensor and a dict of a tensor, a tuple and a non-tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.depth = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.fuse = nn.Conv2d(14, 10, 1)
        self.classify = nn.Linear(10, 4)
        self.regress = nn.Linear(10, 2)

    def forward(self, image, depth, scale: float = 1.0):
        h = torch.relu(self.fuse(torch.cat([self.image(image), self.depth(depth)], dim=1))).mean((2, 3))
        return TwoOutputs(self.classify(h) * scale, {"box": self.regress(h), "pair": (h, None), "n": 3})


def _calibrated(model: nn.Module, inputs) -> nn.Module:
    model.train()
    with torch.no_grad():
        for _ in range(2):
            call_model(model, inputs)
    return model.eval()


def _split_inputs():
    return torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def _two_inputs(as_tuple: bool = False):
    gen = torch.Generator().manual_seed(2)
    image, depth = torch.randn(4, 3, 8, 8, generator=gen), torch.randn(4, 1, 8, 8, generator=gen)
    return (image, depth) if as_tuple else {"image": image, "depth": depth}


@pytest.mark.parametrize("make, inputs", [
    (SplitHeads, _split_inputs),
    (TwoInputs, lambda: _two_inputs()),
    (TwoInputs, lambda: _two_inputs(as_tuple=True)),
], ids=["tuple-output", "dict-inputs", "tuple-inputs"])
def test_shrinking_equals_masking_for_several_inputs_and_outputs(make, inputs):
    torch.manual_seed(0)
    x = inputs()
    model = _calibrated(make(), x)
    graph = ChannelGraph(model, x)
    assert graph.groups, graph.skipped
    plan = random_plan(graph, seed=3)
    masked = copy.deepcopy(model)
    with torch.no_grad():
        ChannelGraph._apply_masks_by_name(masked, graph.masks(plan))
        reference = call_model(masked, x)
    before = sum(p.numel() for p in model.parameters())
    graph.shrink_(plan)  # verifies every output leaf against the masked model, 1e-5
    assert sum(p.numel() for p in model.parameters()) < before
    with torch.no_grad():
        got = call_model(model, x)
    assert [k for k, _ in output_leaves(got)] == [k for k, _ in output_leaves(reference)]
    diff, _ = output_difference(got, reference)
    assert diff < 1e-5


def test_every_head_of_a_model_with_several_outputs_is_kept_whole():
    x = _two_inputs()
    model = _calibrated(TwoInputs(), x)
    # classify is scaled after the layer; fuse's features are returned too (as "pair"), so its width stays
    assert find_output_layers(model, x) == ["classify", "fuse", "regress"]
    graph = ChannelGraph(model, x)
    assert {"classify", "fuse", "regress"} <= set(graph.ignore)
    with torch.no_grad():
        frozen = [p.requires_grad_(False) for p in model.parameters()]
        assert frozen and "regress" in find_output_layers(model, x)
    assert find_output_layers(_calibrated(SplitHeads(), _split_inputs()), _split_inputs()) == ["head_a", "head_b"]


def test_output_leaves_walk_tuples_dicts_and_dataclasses_in_order():
    t = torch.ones(2)
    out = TwoOutputs(t, OrderedDict(box=2 * t, pair=(3 * t, None), n=3))
    assert [(k, v[0].item()) for k, v in output_leaves(out)] == [(".scores", 1.0), (".extras.box", 2.0),
                                                                 (".extras.pair[0]", 3.0)]
    assert [k for k, _ in output_leaves(t)] == ["output"]


def test_outputs_differing_in_one_leaf_or_in_structure_do_not_match():
    a = (torch.zeros(3), {"b": torch.ones(2)})
    assert outputs_match(a, (torch.zeros(3), {"b": torch.ones(2)}), 1e-5) == (True, 0.0)
    ok, diff = outputs_match(a, (torch.zeros(3), {"b": torch.ones(2) + 1e-3}), 1e-5)
    assert not ok and diff == pytest.approx(1e-3, rel=1e-3)
    assert output_difference(a, (torch.zeros(3),))[0] == math.inf  # a leaf missing
    assert output_difference(a, (torch.zeros(4), {"b": torch.ones(2)}))[0] == math.inf  # another shape
    assert not outputs_match(torch.tensor([float("nan")]), torch.zeros(1), 1e-5)[0]


@pytest.mark.parametrize("bad", [[], {}, {1: torch.zeros(1)}, "input", 3])
def test_example_inputs_of_another_kind_are_refused(bad):
    with pytest.raises(TypeError, match="example inputs must be a tensor, a non-empty tuple/list"):
        ChannelGraph(SplitHeads(), bad)


def test_integer_and_boolean_leaves_compare_exactly_and_shared_nans_match():
    logits = torch.tensor([0.5, -1.0])
    assert outputs_match((logits, logits > 0), (logits.clone(), logits > 0), 1e-5) == (True, 0.0)
    assert output_difference((logits, logits > 0), (logits, logits < 0))[0] == math.inf
    nan = torch.tensor([float("nan"), 1.0])
    assert outputs_match(nan, nan.clone(), 1e-5)[0]
    assert output_difference(nan, torch.tensor([0.0, 1.0]))[0] == math.inf


def test_a_model_that_also_returns_a_boolean_mask_is_still_pruned():
    class WithMask(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(6, 8)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            logits = self.head(torch.relu(self.body(x)))
            return logits, logits > 0

    graph = ChannelGraph(WithMask().eval(), torch.randn(4, 6))
    assert "body" in graph.by_root, graph.skipped
