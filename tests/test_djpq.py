"""DJPQ: straight-through gates, learned bit-widths whose forward is the final grid, the BOPs cost against a hand
count, and the method end to end (gates removed physically, weights on their per-layer grids, exact storage, a
checkpoint that reloads)."""

from __future__ import annotations

import pytest
import torch

import prunekit
from prunekit.measurement.formats import encoding_storage
from prunekit.methods.djpq import BitWidth, DJPQHooks, Gate


def test_the_gate_is_hard_forward_and_sigmoid_backward():
    gate = Gate(4, torch.tensor([0, 0, 1, 2, 3, 3]))
    with torch.no_grad():
        gate.logits.copy_(torch.tensor([2.0, -1.0, 0.5, -3.0]))
    mask = gate.channel_mask()
    assert mask.tolist() == [1, 1, 0, 1, 0, 0]
    mask.sum().backward()
    s = torch.sigmoid(gate.logits.detach())
    assert torch.allclose(gate.logits.grad, s * (1 - s) * torch.tensor([2.0, 1.0, 1.0, 2.0]))
    assert float(gate.kept_fraction().detach()) == pytest.approx(3 / 6)


def test_the_quantizer_forward_is_the_whole_bit_grid_and_the_width_gets_a_gradient():
    width = BitWidth(2, 8)
    with torch.no_grad():
        width.beta.fill_(0.3)  # 3.8 bits -> 4 forward: 7 levels each side
    w = torch.randn(16, 9, generator=torch.Generator().manual_seed(0), requires_grad=True)
    q = width(w)
    step = float(w.detach().abs().max()) / 7
    levels = (q.detach() / step).round()
    assert torch.allclose(q.detach(), levels * step, atol=1e-6) and levels.abs().max() <= 7
    assert len(levels.unique()) <= 15
    ((q - 0.5 * w.detach()) ** 2).sum().backward()
    assert width.beta.grad is not None and float(width.beta.grad) != 0.0
    with pytest.raises(ValueError, match="min_bits < max_bits"):
        prunekit.DJPQConfig(min_bits=8, max_bits=4)
    with pytest.raises(ValueError, match="bops must be a fraction"):
        prunekit.DJPQConfig(bops=1.5)


def test_bops_count_macs_times_kept_fractions_times_bits():
    from types import SimpleNamespace

    gates = {"g": Gate(4, torch.arange(4))}
    widths = {"a": BitWidth(2, 8), "b": BitWidth(2, 8)}
    with torch.no_grad():
        widths["b"].beta.fill_(2 / 6)  # 4 bits
        gates["g"].logits.copy_(torch.tensor([1.0, 1.0, -1.0, -1.0]))  # half the channels open
    config = prunekit.DJPQConfig(bops=0.5, activation_bits=8)
    sides = {"a": {"in": {"channels": 3, "members": []}, "out": {"channels": 4, "members": [("g", torch.arange(4))]}},
             "b": {"in": {"channels": 4, "members": [("g", torch.arange(4))]}, "out": {"channels": 2, "members": []}}}
    hooks = DJPQHooks(SimpleNamespace(gates=gates, widths=widths), {"a": 100.0, "b": 300.0}, sides, config)
    # a: 100 MACs x half its outputs x 8 bits x 8; b: 300 x half its inputs x 4 x 8
    assert float(hooks.bops().detach()) == pytest.approx(100 * 0.5 * 8 * 8 + 300 * 0.5 * 4 * 8)
    assert hooks.reference == (100 + 300) * 64
    assert float(hooks.penalty(None).detach()) == pytest.approx(0.0)  # 0.3125 of the 8-bit BOPs, under 0.5


class _Concat(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn = torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8)
        self.c2, self.c3 = torch.nn.Conv2d(1, 6, 3, padding=1), torch.nn.Conv2d(14, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        y = self.c3(torch.relu(torch.cat([self.bn(self.c1(x)), self.c2(x)], 1)))
        return self.fc(y.mean((2, 3)))


def test_a_layer_fed_by_a_concatenation_counts_every_group_that_feeds_it():
    from types import SimpleNamespace

    from prunekit.channels.graph import ChannelGraph
    from prunekit.methods.djpq import layer_sides
    from prunekit.methods.group_training import GroupUnits

    model = _Concat()
    graph = ChannelGraph(model, torch.randn(2, 1, 6, 6))
    units = GroupUnits(model, graph, {g.root: 1 for g in graph.groups})
    sides = layer_sides(units, dict(model.named_modules()), ["c1", "c2", "c3", "fc"])
    fed = sides["c3"]["in"]
    assert fed["channels"] == 14 and sorted(len(r) for _, r in fed["members"]) == [6, 8]
    gates = {root: Gate(g.units, g.channel_unit) for root, g in units.groups.items()}
    with torch.no_grad():
        gates["c2"].logits.fill_(-1.0)  # all of c2's 6 channels closed, c1's 8 open
    hooks = DJPQHooks(SimpleNamespace(gates=gates, widths={}), {"c3": 10.0}, sides, prunekit.DJPQConfig())
    assert float(hooks.kept("c3", "in").detach()) == pytest.approx(8 / 14)


def test_djpq_removes_closed_units_and_leaves_weights_on_their_grids(tmp_path):
    data = prunekit.load_dataset("synthetic")
    torch.manual_seed(0)
    model = prunekit.create_model("lenet5", num_classes=4, in_channels=1, input_size=12)
    ctx = prunekit.RunContext(progress=False, log=lambda *_: None,
                              train=prunekit.TrainConfig(epochs=0, lr=0.02, augment="none"))
    record = prunekit.prune_(model, prunekit.DJPQConfig(bops=0.3, epochs=3), data, ctx)
    bits = record.encoding["layer_bits"]
    assert set(bits) == {"conv1", "conv2", "fc1", "fc2"} and all(2 <= b <= 8 for b in bits.values())
    modules = dict(model.named_modules())
    for name, b in bits.items():
        levels = modules[name].weight.detach() / record.encoding["scales"][name]
        assert torch.allclose(levels, levels.round(), atol=1e-4) and levels.abs().max() <= 2 ** (b - 1) - 1 + 1e-4
    assert record.results["bops"]["ratio"] < 0.6 and record.results["bops"]["end"] < record.results["bops"]["start"]
    storage = encoding_storage(model, record.encoding)
    assert storage["values"].endswith("-bit codes per layer") and storage["compression"][storage["best"]] > 4
    spec = {"name": "lenet5", "num_classes": 4, "in_channels": 1, "input_size": 12}
    path = prunekit.save_compressed(tmp_path / "m.safetensors", model, spec, record.changes,
                                    {"encoding": record.encoding})
    loaded, meta = prunekit.load_compressed(path)
    x = data.test.tensors[0][:8]
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
    assert meta["encoding"]["layer_bits"] == bits
