"""DJPQ: differentiable joint pruning and quantization (Wang, Lu, Blankevoort 2020, arXiv 2007.10463).

Channel gates and per-layer weight bit-widths are learned together with the weights against a bit-operations
cost. For a conv/linear layer ``l`` with ``MACs_l`` multiply-accumulates, ``BOPs_l = MACs_l * f_in,l * f_out,l *
b_l * b_a``: ``f`` the fractions of its input and output channels the gates keep (over every group that feeds or reads
it: a concatenation's inputs come from several), ``b_l`` its weight bit-width and
``b_a`` the activation width. Training minimises ``CE + lambda * max(0, BOPs / BOPs_8x8 - bops) / bops``, where
``BOPs_8x8`` is the dense network at 8-bit weights and activations and ``bops`` the target fraction of it.

* **Gates**: one logit ``s_u`` per unit (channel, tied set or head) of every prunable coupled group; the forward
  pass multiplies every slice that produces the unit by the hard gate ``[s_u > 0]`` with the gradient of
  ``sigmoid(s_u)`` (straight-through), and ``f`` is the share of a group's channels open (the same estimator).
* **Bit-widths**: ``b_l = min_bits + (max_bits - min_bits) beta_l``, ``beta_l`` kept in [0, 1] after every step (from
  1: ``max_bits``); the weight is fake-quantized with ``L = 2^(b_l - 1) - 1`` levels each side and step ``d = max|w| /
  L``, ``q = w + d * stopgrad(round(w/d) - w/d)``, so the loss reaches ``b_l`` through the step (the gradient of LSQ,
  Esser et al. 2020, arXiv 1902.08153); the forward pass uses ``b_l`` rounded to whole bits (straight-through), the
  grid the weights end on.

At the end each layer's width is rounded to whole bits and its weights are put on that grid (``encoding.layer_bits``
and ``scales``, so the storage counts are exact), every unit whose gate is closed is removed physically (a group keeps
at least one), and BatchNorm is re-estimated on the quantized network. ``results["bops"]`` gives the BOPs, before and
after.

Deviations from the paper: the gates are straight-through hard gates, not the paper's variational information
bottleneck; activations stay at a fixed width (``activation_bits``, counted in BOPs, not quantized); the step of
each layer follows its largest weight instead of being learned; the bit-width is rounded at the end rather than
learned on integers.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from prunekit.channels.graph import ChannelGraph, SliceKind, ignored_modules
from prunekit.configs import Config, coerce_fields
from prunekit.methods.group_training import GroupUnits, SliceMask, train_then_remove_
from prunekit.methods.registry import MethodSpec, PruneRecord, RunContext, register
from prunekit.training import TrainHooks


@dataclass(frozen=True)
class DJPQConfig(Config):
    """DJPQ (Wang et al. 2020): learned channel gates and per-layer weight bit-widths trained against BOPs.

    Args:
        bops: Target bit operations, as a fraction of the dense network's at 8-bit weights and activations.
        ignore: Modules to leave alone (neither gated nor quantized), containers included.
        epochs: Epochs of joint training.
        penalty: ``lambda``, the weight of the BOPs excess over the target.
        gate_lr_scale, bits_lr_scale: Learning rates of the gate logits and of the bit-width parameters, times the
            weights' (no weight decay on them).
        min_bits, max_bits: Range of the learned weight bit-widths.
        activation_bits: Activation width counted in BOPs (activations are not quantized).
        bn_images: Training images for BatchNorm re-estimation after the removal (0 = off).
    """

    bops: float = 0.25
    ignore: tuple[str, ...] = ()
    epochs: int = 1
    penalty: float = 1.0
    gate_lr_scale: float = 100.0
    bits_lr_scale: float = 10.0
    min_bits: int = 2
    max_bits: int = 8
    activation_bits: int = 8
    bn_images: int = 512

    def __post_init__(self) -> None:
        coerce_fields(self)
        object.__setattr__(self, "ignore", tuple(self.ignore))
        if isinstance(self.bops, bool) or not isinstance(self.bops, (int, float)) or not 0 < self.bops < 1:
            raise ValueError(f"bops must be a fraction in (0, 1) of the 8-bit network's bit operations, got "
                             f"{self.bops!r}")
        for name, low in (("epochs", 1), ("bn_images", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        for name in ("penalty", "gate_lr_scale", "bits_lr_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a number > 0, got {value!r}")
        bits = (self.min_bits, self.max_bits, self.activation_bits)
        if any(isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= 16 for b in bits) or \
                self.min_bits >= self.max_bits:
            raise ValueError(f"min_bits < max_bits and activation_bits must be ints in [2, 16], got min_bits "
                             f"{self.min_bits!r}, max_bits {self.max_bits!r}, activation_bits {self.activation_bits!r}")

    def label(self) -> str:
        return f"djpq bops={self.bops:g}"


class Gate(nn.Module):
    """One group's unit logits and its straight-through hard gate per channel."""

    def __init__(self, units: int, channel_unit: torch.Tensor) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.full((units,), 1.0))  # open, where sigmoid still has a slope
        self.register_buffer("channel_unit", channel_unit.clone(), persistent=False)

    def unit_gates(self) -> torch.Tensor:
        """``[s_u > 0]`` forward, the gradient of ``sigmoid(s_u)`` backward."""
        soft = torch.sigmoid(self.logits)
        return (self.logits > 0).to(soft.dtype) + soft - soft.detach()

    def channel_mask(self) -> torch.Tensor:
        return self.unit_gates()[self.channel_unit]

    def kept_fraction(self) -> torch.Tensor:
        return self.channel_mask().mean()


class BitWidth(nn.Module):
    """A layer's learned weight bit-width, and the fake quantization it parametrizes the weight with."""

    def __init__(self, min_bits: int, max_bits: int) -> None:
        super().__init__()
        self.min_bits, self.max_bits = min_bits, max_bits
        self.beta = nn.Parameter(torch.tensor(1.0))  # starts at max_bits

    def bits(self) -> torch.Tensor:
        return self.min_bits + (self.max_bits - self.min_bits) * self.beta.clamp(0.0, 1.0)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        bits = self.bits()
        bits = bits + (bits.round() - bits).detach()  # whole bits forward, as the final grid; the slope backward
        levels = 2 ** (bits - 1) - 1
        step = w.detach().abs().max().clamp_min(1e-12) / levels
        r = w / step
        return w + step * (r.round() - r).detach()


class _Quantize(nn.Module):
    """Parametrization: the weight through its layer's :class:`BitWidth` (held outside the module tree)."""

    def __init__(self, width: BitWidth) -> None:
        super().__init__()
        self._width = [width]

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self._width[0](w)


class DJPQHooks(TrainHooks):
    """The BOPs penalty on every step; gates and bit-widths are trained by the job's optimizer with the weights
    (the model holds them in ``_djpq``), so they go through every commit."""

    def __init__(self, holder: SimpleNamespace, macs: dict[str, float], sides: dict[str, dict[str, Any]],
                 config: DJPQConfig) -> None:
        self.holder, self.macs, self.sides, self.config = holder, macs, sides, config
        self.reference = sum(macs.values()) * 8 * 8

    def kept(self, name: str, side: str) -> torch.Tensor:
        """The share of a layer's input or output channels the gates keep open; its channels may come from
        several groups (a concatenation), and channels of no gated group count as kept."""
        entry = self.sides[name][side]
        if not entry["members"]:
            return torch.ones(())
        open_ = torch.tensor(float(entry["channels"] - sum(len(r) for _, r in entry["members"])))
        for root, root_idxs in entry["members"]:
            open_ = open_ + self.holder.gates[root].channel_mask()[root_idxs].sum()
        return open_ / entry["channels"]

    def bops(self) -> torch.Tensor:
        """BOPs of the network the gates and widths describe now (straight-through: exact forward, a slope)."""
        total = torch.zeros(())
        for name, macs in self.macs.items():
            term = macs * self.config.activation_bits * self.kept(name, "in") * self.kept(name, "out")
            width = self.holder.widths[name].bits() if name in self.holder.widths else torch.tensor(32.0)
            total = total + term * width
        return total

    @torch.no_grad()
    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        for w in self.holder.widths.values():  # projected: the width parameter stays where its gradient flows
            w.beta.clamp_(0.0, 1.0)

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        gates = [p for g in self.holder.gates.values() for p in g.parameters()]
        widths = [p for w in self.holder.widths.values() for p in w.parameters()]
        ours = {id(p) for p in gates + widths}
        rest = [p for p in model.parameters() if id(p) not in ours]
        return [{"params": rest},
                {"params": gates, "lr_scale": self.config.gate_lr_scale, "weight_decay": 0.0},
                {"params": widths, "lr_scale": self.config.bits_lr_scale, "weight_decay": 0.0}]

    def penalty(self, model: nn.Module) -> torch.Tensor:
        ratio = self.bops() / self.reference
        return self.config.penalty * torch.relu(ratio - self.config.bops) / self.config.bops

    def epoch_metrics(self, model: nn.Module, epoch: int) -> dict[str, float]:
        with torch.no_grad():
            widths = [float(w.bits()) for w in self.holder.widths.values()]
            closed = sum(int((g.logits <= 0).sum()) for g in self.holder.gates.values())
            return {"bops_ratio": float(self.bops() / self.reference), "mean_bits": sum(widths) / max(len(widths), 1),
                    "closed_units": closed}


def _key(name: str) -> str:
    return name.replace(".", "__")


def layer_sides(units: GroupUnits, modules: dict[str, nn.Module], layers: list[str]) -> dict[str, dict[str, Any]]:
    """Per layer and side (``"in"``, ``"out"``): its channel count and the (group root, group channels) that feed or
    read it, one entry per group (a concatenation's input is fed by several)."""
    sides = {n: {"in": {"channels": _width(modules[n], "in"), "members": []},
                 "out": {"channels": _width(modules[n], "out"), "members": []}} for n in layers}
    for root, g in units.groups.items():
        for member in g.group.members:
            if member.name in sides and member.slices:
                side = "out" if member.kind is SliceKind.OUT else "in"
                sides[member.name][side]["members"].append((root, torch.as_tensor(member.root_idxs)))
    return sides


def _width(module: nn.Module, side: str) -> int:
    if isinstance(module, nn.Conv2d):
        return module.in_channels if side == "in" else module.out_channels
    return module.in_features if side == "in" else module.out_features


def djpq_(model: nn.Module, data, config: DJPQConfig, ctx: RunContext) -> PruneRecord:
    """DJPQ on ``model`` in place (the ``apply`` of the ``djpq`` method)."""
    from prunekit.channels.graph import find_output_layers
    from prunekit.measurement.metrics import flops_by_module

    example = data.example_inputs()
    graph = ChannelGraph(model, example, ignore=config.ignore)
    units = GroupUnits(model, graph, {g.root: 1 for g in graph.groups})
    modules = dict(model.named_modules())
    skip = ignored_modules(model, list(config.ignore))
    per_module = flops_by_module(model, data.flops_inputs())
    layers = [n for n, m in modules.items() if isinstance(m, (nn.Conv2d, nn.Linear)) and n not in skip
              and n in per_module]
    macs = {n: per_module[n] / 2 for n in layers}
    sides = layer_sides(units, modules, layers)
    holder = nn.Module()
    holder.gates = nn.ModuleDict({_key(root): Gate(g.units, g.channel_unit) for root, g in units.groups.items()})
    holder.widths = nn.ModuleDict({_key(n): BitWidth(config.min_bits, config.max_bits) for n in layers})
    gates = {root: holder.gates[_key(root)] for root in units.groups}
    widths = {n: holder.widths[_key(n)] for n in layers}
    view = SimpleNamespace(gates=gates, widths=widths)  # the same modules keyed by the real names, for the hooks
    registered = []
    hooks = DJPQHooks(view, macs, sides, config)
    with torch.no_grad():
        start_bops = float(hooks.bops())
    final: dict[str, Any] = {}
    scales: dict[str, float] = {}

    def release() -> None:
        for module, attr in registered:
            if parametrize.is_parametrized(module, attr):
                parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
        if hasattr(model, "_djpq"):
            del model._djpq

    def choose() -> dict[str, list[int]]:
        with torch.no_grad():
            final["bops_ratio_trained"] = float(hooks.bops() / hooks.reference)
            final["bits"] = {n: int(round(float(w.bits()))) for n, w in widths.items()}
            closed = {}
            for root, gate in gates.items():
                off = [u for u in range(len(gate.logits)) if gate.logits[u] <= 0]
                if len(off) == len(gate.logits):  # a group keeps at least its most open unit
                    off.remove(int(gate.logits.argmax()))
                closed[root] = off
        release()
        with torch.no_grad():  # the grid the training forward used: whole bits, step from the layer's largest weight
            for n, bits in final["bits"].items():
                w = modules[n].weight
                levels = 2 ** (bits - 1) - 1
                step = float(w.abs().max().clamp_min(1e-12)) / levels
                w.copy_((w / step).round().clamp(-levels, levels) * step)
                scales[n] = step
        return {root: off for root, off in closed.items() if off}

    try:
        for n in layers:
            parametrize.register_parametrization(modules[n], "weight", _Quantize(widths[n]))
            registered.append((modules[n], "weight"))
        for root, g in units.groups.items():
            for _, s in g.slices:
                module_name, _, attr = s.name.rpartition(".")
                parametrize.register_parametrization(modules[module_name], attr, SliceMask(gates[root], s))
                registered.append((modules[module_name], attr))
        model.add_module("_djpq", holder)
        record, _ = train_then_remove_(model, data, units, hooks, config.epochs, choose, ctx, method=config.method,
                                       bn_images=config.bn_images, finetune_epochs=0, ignore=config.ignore)
    finally:
        release()
    record.encoding = {"quant": "none", "layer_bits": final["bits"], "scales": scales, "masked_layers": list(scales)}
    kept = _kept_macs(model, data, macs)
    end_bops = sum(kept[n] * final["bits"][n] * config.activation_bits for n in kept)
    record.results.update(bops={"dense_8x8": hooks.reference, "start": start_bops, "end": end_bops,
                                "ratio_trained": final["bops_ratio_trained"], "ratio": end_bops / hooks.reference},
                          layer_bits=final["bits"])
    outputs = set(find_output_layers(model, data.example_inputs()))
    record.notes.append(f"{config.epochs} epoch(s) of joint gate + bit-width training against {config.bops:g} of the "
                        f"8-bit network's BOPs; reached {end_bops / hooks.reference:.3f} (weights "
                        f"{min(final['bits'].values())}-{max(final['bits'].values())} bits, activations counted at "
                        f"{config.activation_bits}); output layer(s) {', '.join(sorted(outputs))} quantized too; no "
                        "fine-tuning after the removal (it would leave the grid)")
    return record


def _kept_macs(model: nn.Module, data, macs: dict[str, float]) -> dict[str, float]:
    from prunekit.measurement.metrics import flops_by_module

    now = flops_by_module(model, data.flops_inputs())
    return {n: now[n] / 2 for n in macs if n in now}


register(MethodSpec("djpq", DJPQConfig, djpq_,
                    "Wang, Lu, Blankevoort 2020, Differentiable Joint Pruning and Quantization for Hardware "
                    "Efficiency, arXiv 2007.10463",
                    "channel gates and per-layer weight bit-widths learned together against a BOPs target"))
