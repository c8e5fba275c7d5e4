"""Channel groups and physical surgery, on top of Torch-Pruning's DependencyGraph (Fang et al. 2023,
arXiv 2301.12900).

This is the only prunekit module that imports ``torch_pruning``: everything else sees :class:`ChannelGroup`
(coupled channel slices that must go together: conv/linear out-channels, the norm after them, the next layers'
in-channels, residual partners, concat slices, depthwise convs) and :class:`ChannelPlan` (which channels of
which group to remove). Swapping the engine means rewriting this file only.

The same plan can be applied as masks (slices zeroed, shapes kept) or physically; :meth:`ChannelGraph.shrink_`
checks that both give the same outputs and rolls the model back, naming the group, when they do not.
"""

from __future__ import annotations

import copy
import difflib
import enum
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.pruner import function as tpf

from .heads import AttentionSpec, find_attention, head_rows, head_units, projection, shrink_heads_
from .model_io import (
    ExampleInputs,
    call_model,
    check_example_inputs,
    output_difference,
    output_tensors,
    outputs_match,
)


class UnsupportedModelError(ValueError):
    """A layer or op prunekit cannot shrink correctly; the message names it and how to exclude it."""


class SliceKind(str, enum.Enum):
    """Whether a member loses output slices (rows of a weight) or input slices (columns)."""

    OUT = "out"
    IN = "in"


@dataclass(frozen=True)
class ParamSlice:
    """``param`` indexed by ``idxs`` along ``dim``; ``root_idxs[i]`` is the group channel of ``idxs[i]``."""

    name: str
    param: torch.Tensor
    dim: int
    idxs: torch.Tensor
    root_idxs: torch.Tensor
    is_norm: bool
    blocks: int = 1  # > 1: input channels of a grouped conv; idxs are global, the weight holds them per block

    def _local(self) -> tuple[torch.Tensor, torch.Tensor]:
        """For a grouped conv's input slices: (block of each idx, its column inside the block)."""
        per_block = self.param.shape[1]
        return self.idxs // per_block, self.idxs % per_block

    def rows(self, tensor: torch.Tensor | None = None) -> torch.Tensor:
        """The selected slices of ``tensor`` (default the parameter) as ``(len(idxs), -1)``."""
        t = (self.param if tensor is None else tensor).detach()
        if self.blocks == 1:
            return t.index_select(self.dim, self.idxs.to(t.device)).movedim(self.dim, 0).reshape(len(self.idxs), -1)
        rows_per_block = t.shape[0] // self.blocks
        block, col = self._local()
        return torch.stack([t[b * rows_per_block:(b + 1) * rows_per_block, c].reshape(-1)
                            for b, c in zip(block.tolist(), col.tolist())]) if len(self.idxs) else t.new_zeros(0, 0)

    def zero_(self, mask: torch.Tensor, hit: torch.Tensor) -> None:
        """Zero the slices of ``mask`` for the (member-local) indices ``hit``."""
        if self.blocks == 1:
            mask.index_fill_(self.dim, hit, 0.0)
            return
        rows_per_block, per_block = mask.shape[0] // self.blocks, mask.shape[1]
        for c in hit.tolist():
            b, col = divmod(c, per_block)
            mask[b * rows_per_block:(b + 1) * rows_per_block, col] = 0.0

    def removed_count(self, hit: int) -> float:
        """How many entries of dimension ``dim`` removing ``hit`` of the idxs takes away."""
        return hit / self.blocks


@dataclass
class GroupMember:
    """One coupled layer (or parameter) of a group, the kind of slice it loses and where."""

    name: str
    module: Any
    kind: SliceKind
    op: str
    idxs: list[int]
    root_idxs: list[int]
    slices: list[ParamSlice] = field(default_factory=list)


# Layers whose removal of a channel is NOT the same as zeroing it: they mix channels in a way that a zero
# still affects (normalisation statistics over channels, attention heads, recurrent gates).
_NON_EQUIVALENT = {
    tpf.LayernormPruner: "LayerNorm normalises over the channels, so zeroing one is not removing it",
    tpf.GroupNormPruner: "GroupNorm normalises over channel groups, so zeroing one is not removing it",
    tpf.MultiheadAttentionPruner: "MultiheadAttention embedding channels are split into heads",
    tpf.LSTMPruner: "LSTM hidden units feed back through the gates",
}


def _member_slices(name: str, module: Any, handler, pruning_dim: int | None, idxs: list[int],
                   root_idxs: list[int], residual: bool = False) -> list[ParamSlice] | str:
    """Parameter slices a member loses, or a reason string when the layer cannot be masked exactly (a LayerNorm
    loses its weight and bias slices when ``residual`` opts in to inexact residual-stream pruning)."""
    pruner = handler.__self__
    out = handler.__name__ == "prune_out_channels"
    ix, rx = torch.as_tensor(idxs, dtype=torch.long), torch.as_tensor(root_idxs, dtype=torch.long)

    def sl(pname: str, p: torch.Tensor | None, dim: int, norm: bool = False) -> list[ParamSlice]:
        return [] if p is None else [ParamSlice(f"{name}.{pname}" if pname else name, p, dim, ix, rx, norm)]

    if residual and isinstance(pruner, tpf.LayernormPruner):
        return sl("weight", module.weight, 0, True) + sl("bias", module.bias, 0, True)
    for kind, reason in _NON_EQUIVALENT.items():
        if isinstance(pruner, kind):
            return reason
    if isinstance(pruner, tpf.DepthwiseConvPruner):
        return sl("weight", module.weight, 0) + sl("bias", module.bias, 0)
    if isinstance(pruner, tpf.ConvPruner):
        if out:
            return sl("weight", module.weight, 1 if module.transposed else 0) + sl("bias", module.bias, 0)
        if module.groups > 1:
            if module.transposed:
                return f"transposed grouped convolution (groups={module.groups}) has no prunekit rule"
            return [ParamSlice(f"{name}.weight", module.weight, 1, ix, rx, False, blocks=module.groups)]
        return sl("weight", module.weight, 0 if module.transposed else 1)
    if isinstance(pruner, tpf.LinearPruner):
        return sl("weight", module.weight, 0) + sl("bias", module.bias, 0) if out else sl("weight", module.weight, 1)
    if isinstance(pruner, (tpf.BatchnormPruner, tpf.InstanceNormPruner)):
        return sl("weight", module.weight, 0, True) + sl("bias", module.bias, 0, True)
    if isinstance(pruner, tpf.PReLUPruner):
        return sl("weight", module.weight, 0) if module.weight.numel() > 1 else []
    if isinstance(pruner, tpf.EmbeddingPruner):
        return sl("weight", module.weight, 1)
    if isinstance(pruner, tpf.ParameterPruner):
        dim = pruning_dim if pruning_dim is not None else -1
        return sl("", module, dim % module.dim())
    return f"no prunekit rule for {type(pruner).__name__}"


@dataclass
class ChannelGroup:
    """Coupled channels that are removed together; channel ``i`` of the group is ``root`` out-channel ``i``.

    A criterion maps a group to ``size`` scores (low = remove first), typically with :meth:`reduce`.
    """

    root: str
    size: int
    members: list[GroupMember]
    _tp_group: Any = field(repr=False, default=None)
    units: list[tuple[int, ...]] = field(default_factory=list)
    heads: AttentionSpec | None = None  # set for an attention block's heads (units are heads)
    exact: bool = True  # False: channels pass through a LayerNorm, removing them is not masking them

    def __post_init__(self) -> None:
        if not self.units:
            self.units = _tied_units(self)

    @property
    def tied(self) -> bool:
        """True when channels must go in sets (a grouped conv keeps the same positions in every group)."""
        return len(self.units) != self.size

    def slices(self, include_norm: bool = True) -> Iterator[ParamSlice]:
        for m in self.members:
            for s in m.slices:
                if include_norm or not s.is_norm:
                    yield s

    def reduce(self, per_slice, include_norm: bool = False) -> torch.Tensor:
        """Sum ``per_slice(slice) -> values[len(slice.idxs)]`` over members into the group's channels."""
        scores = torch.zeros(self.size, dtype=torch.float64)
        for s in self.slices(include_norm):
            scores.index_add_(0, s.root_idxs, per_slice(s).detach().double().cpu())
        return scores

    def describe(self) -> str:
        members = ", ".join(f"{m.name}:{m.kind.value}" for m in self.members)
        if self.heads is not None:
            h = self.heads
            kv = f", {h.num_kv_heads} key/value heads" if h.num_kv_heads != h.num_heads else ""
            return f"{self.root} ({h.num_heads} heads of {h.head_dim}{kv}; {members})"
        return f"{self.root} ({self.size} channels; {members})"


def _head_group(spec: AttentionSpec, modules: dict[str, nn.Module]) -> ChannelGroup:
    """The channel group of an attention block's heads: q/k/v rows and output-projection columns, in units of
    whole heads (:mod:`prunekit.channels.heads`)."""
    rows = head_rows(spec)
    members = []
    for role, kind in (("q", SliceKind.OUT), ("k", SliceKind.OUT), ("v", SliceKind.OUT), ("out", SliceKind.IN)):
        name = getattr(spec, role)
        module = modules[name]
        idxs, root_idxs = rows[role]
        (weight_name, weight), bias = projection(spec, role, modules)
        slices = [ParamSlice(weight_name, weight, 0 if kind is SliceKind.OUT else 1, idxs, root_idxs, False)]
        if kind is SliceKind.OUT and bias is not None:
            slices.append(ParamSlice(bias[0], bias[1], 0, idxs, root_idxs, False))
        members.append(GroupMember(name, module, kind, f"prune_heads ({role})", idxs.tolist(), root_idxs.tolist(),
                                   slices))
    return ChannelGroup(root=spec.module, size=spec.num_heads * spec.head_dim, members=members,
                        units=head_units(spec), heads=spec)


def _tied_units(group: ChannelGroup) -> list[tuple[int, ...]]:
    """Sets of group channels that must be removed together, in order of their first channel.

    A grouped convolution (1 < groups < channels) splits its input and output channels into equal blocks; it
    stays a valid grouped convolution only if the same positions go from every block, so the channels at one
    position in all blocks are tied (Fang et al. 2023 prune grouped convs the same way).
    """
    parent = list(range(group.size))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for m in group.members:
        conv = m.module
        if not isinstance(conv, nn.modules.conv._ConvNd) or conv.groups == 1:
            continue
        if conv.groups == conv.in_channels == conv.out_channels:
            continue  # depthwise: every channel is its own group, nothing to tie
        size = conv.in_channels if m.kind is SliceKind.IN else conv.out_channels
        per_block = size // conv.groups
        first: dict[int, int] = {}
        for idx, root_idx in zip(m.idxs, m.root_idxs):
            pos = idx % per_block
            if pos in first:
                parent[find(root_idx)] = find(first[pos])
            else:
                first[pos] = root_idx
    units: dict[int, list[int]] = {}
    for c in range(group.size):
        units.setdefault(find(c), []).append(c)
    return sorted((tuple(u) for u in units.values()), key=lambda u: u[0])


@dataclass(frozen=True)
class ChannelPlan:
    """Which channels to remove, per group root (module name) -> sorted channel indices.

    Round-trips through JSON (``to_dict``/``from_dict``): this is the architecture change a saved pruned model
    replays on a freshly built network.
    """

    removed: dict[str, tuple[int, ...]]

    def __post_init__(self) -> None:
        clean: dict[str, tuple[int, ...]] = {}
        for root, idxs in self.removed.items():
            bad = [i for i in idxs if isinstance(i, bool) or int(i) != i]
            if bad:
                raise ValueError(f"plan for {root!r} has non-integer channel indices {bad[:4]}")
            idxs = tuple(sorted(int(i) for i in idxs))
            if len(set(idxs)) != len(idxs) or (idxs and idxs[0] < 0):
                raise ValueError(f"plan for {root!r} has negative or repeated channel indices: {idxs[:8]}")
            if idxs:
                clean[root] = idxs
        object.__setattr__(self, "removed", clean)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "channels", "removed": {k: list(v) for k, v in self.removed.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ChannelPlan:
        if data.get("kind") != "channels" or not isinstance(data.get("removed"), dict):
            raise ValueError("not a channel plan: expected {'kind': 'channels', 'removed': {...}}, "
                             f"got {str(data)[:80]}")
        return cls({k: tuple(v) for k, v in data["removed"].items()})

    def num_removed(self) -> int:
        return sum(len(v) for v in self.removed.values())

    def __bool__(self) -> bool:
        return bool(self.removed)


def ignored_modules(model: nn.Module, names: Sequence[str]) -> set[str]:
    """Every module name under the ``names`` a user asked to leave alone (a container such as ``layer1`` covers
    all the layers inside it), validated.

    Raises:
        ValueError: a name that is not a module of ``model``, with the closest names.
    """
    modules = dict(model.named_modules())
    unknown = [n for n in names if not isinstance(n, str) or n not in modules or not n]
    if unknown:
        close = sorted({c for n in unknown if isinstance(n, str) and n
                        for c in difflib.get_close_matches(n, modules, 3) if c})
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"ignore names {unknown} are not modules of the model; known: "
                         f"{', '.join(n for n in modules if n)[:400]}.{hint}")
    return {f"{n}.{sub}" if sub else n for n in names for sub, _ in modules[n].named_modules()}


def find_output_layers(model: nn.Module, example_inputs: ExampleInputs) -> list[str]:
    """Names of the conv/linear layers nearest to each of the model's outputs (the classifier, every head of a
    model with several, a feature map returned as it is), whose out-channels therefore cannot be removed.

    Found by walking the autograd graph back from every output tensor to the first layer output on each path (so
    an op after the classifier -- log_softmax, scaling, indexing -- does not hide it); when outputs carry no
    graph (frozen parameters), the layers whose output is returned as it is, else the last layer to run.
    ``example_inputs``: a tensor, a tuple of positional or a dict of keyword arguments."""
    produced: list[tuple[str, torch.Tensor]] = []  # (layer, output) in execution order; tensors kept alive
    handles = []
    for name, module in model.named_modules():
        if name and isinstance(module, (nn.Linear, nn.Conv2d, nn.Conv1d, nn.ConvTranspose2d)):
            handles.append(module.register_forward_hook(
                lambda mod, inp, out, name=name: produced.append((name, out))))
    was_training = model.training
    try:  # eval: a train-mode pass would move BatchNorm running statistics
        with torch.enable_grad():
            out = call_model(model.eval(), example_inputs)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    outs = output_tensors(out)
    found = {name for o in outs for name, t in produced if t is o}
    layer_of = {t.grad_fn: name for name, t in produced if isinstance(t, torch.Tensor) and t.grad_fn is not None}
    stack = [o.grad_fn for o in outs if o.grad_fn is not None]
    seen = set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if fn in layer_of:
            found.add(layer_of[fn])
        else:
            stack.extend(next_fn for next_fn, _ in fn.next_functions)
    if not found and produced:
        found = {produced[-1][0]}
    return sorted(found)


class ChannelGraph:
    """The coupled channel groups of ``model``, found by tracing ``example_inputs``.

    Args:
        model: The network (its modules are pruned in place by :meth:`shrink_`).
        example_inputs: A small batch used for tracing and for the masks-vs-shrink check: a tensor, a tuple of
            positional arguments or a dict of keyword arguments (``input_ids``, ``attention_mask``). Outputs may
            be nested tuples, dicts or dataclasses; they are compared leaf by leaf.
        ignore: Names of modules to leave alone (their out-channels are never removed). The layer producing the
            model output is always added, so the number of classes never changes.
        probe: Remove one unit of each group on a copy and compare with masking it; groups that disagree (e.g.
            channels that pass through a LayerNorm) are moved to ``skipped`` with the reason, so no plan can touch
            them.
        attention: Attention blocks to prune by whole heads that :func:`~prunekit.channels.heads.find_attention`
            does not find from module attributes (:class:`~prunekit.channels.heads.AttentionSpec`). Found and
            given blocks become one group each whose units are heads (key/value heads with their query heads under
            grouped-query attention).
        residual: Also offer the groups whose channels pass through a LayerNorm (a transformer's residual
            stream). Removing such a channel is not the same as zeroing it, so these groups are marked
            ``exact=False``; :meth:`shrink_` removes them after its exact check and reports the output change in
            :attr:`output_change`. Off by default: nothing inexact ever happens silently.

    Raises:
        UnsupportedModelError: the model cannot be traced.
    """

    def __init__(self, model: nn.Module, example_inputs: ExampleInputs, ignore: Sequence[str] = (),
                 probe: bool = True, attention: Sequence[AttentionSpec] = (), residual: bool = False) -> None:
        check_example_inputs(example_inputs)
        self.model = model
        self._given = tuple(attention)
        self.residual = bool(residual)
        self.output_change: dict[str, float] | None = None  # set by shrink_ when inexact groups were removed
        self.example_inputs = example_inputs
        modules = dict(model.named_modules())
        covered = ignored_modules(model, list(ignore))
        was_training = model.training
        model.eval()
        self.ignore = sorted(set(ignore) | set(find_output_layers(model, example_inputs)))
        ignored = [modules[n] for n in sorted(covered | set(self.ignore))]
        try:
            with torch.enable_grad():  # the graph is traced through autograd
                self._dg = tp.DependencyGraph().build_dependency(
                    model, example_inputs=example_inputs, forward_fn=call_model, output_transform=output_tensors,
                    verbose=False)
        except Exception as exc:  # noqa: BLE001 - tracing failures come in many types
            raise UnsupportedModelError(
                f"cannot trace {type(model).__name__} to find its channel groups: {exc.__class__.__name__}: {exc}. "
                "prunekit needs a model whose forward runs on the example inputs (a tensor, a tuple of positional "
                "or a dict of keyword arguments); exclude the failing module with ignore=[...] or wrap it"
            ) from exc
        finally:
            model.train(was_training)
        self._names = {m: n for n, m in model.named_modules()}
        self._names.update({p: n for n, p in model.named_parameters()})
        self.groups: list[ChannelGroup] = []
        self.skipped: dict[str, str] = {}
        roots = (nn.Conv2d, nn.Conv1d, nn.ConvTranspose2d, nn.Linear)
        for g in self._dg.get_all_groups(ignored_layers=ignored, root_module_types=roots):
            built = self._wrap(g)
            if isinstance(built, ChannelGroup):
                self.groups.append(built)
        self._add_heads(attention, covered, modules)
        self.by_root = {g.root: g for g in self.groups}
        if probe:
            self._probe()

    @torch.no_grad()
    def _probe(self) -> None:
        shrunk = copy.deepcopy(self.model).eval()
        masked = copy.deepcopy(self.model).eval()
        trial = ChannelGraph(shrunk, self.example_inputs, self.ignore, probe=False, attention=self._given,
                             residual=self.residual)
        masked_params = dict(masked.named_parameters())
        for group in list(self.groups):
            if group.size < 2 or group.root not in trial.by_root:
                continue
            if len(group.units) < 2:
                continue
            plan = ChannelPlan({group.root: group.units[len(group.units) // 2]})
            saved = {n: p.detach().clone() for n, p in masked_params.items()}
            backup = _snapshot(shrunk)
            ChannelGraph._apply_masks_by_name(masked, self.masks(plan))
            reason = None
            try:
                trial._prune_group(trial.by_root[group.root], plan.removed[group.root])
                got = call_model(shrunk, self.example_inputs)
                ok, diff = outputs_match(got, call_model(masked, self.example_inputs), 1e-4)
                if not group.exact:  # opted in: it only has to run and keep the output shapes
                    ok = math.isfinite(output_difference(got, call_model(masked, self.example_inputs))[0])
                if not ok:
                    reason = (f"shrinking it changes the outputs by {diff:.3g} beyond masking it" if group.exact
                              else "shrinking it changes the output shapes")
            except Exception as exc:  # noqa: BLE001 - any failure means the group cannot be shrunk safely
                reason = f"shrinking it breaks the forward pass ({exc.__class__.__name__}: {str(exc)[:120]})"
            if reason is None and not group.exact:  # keep later comparisons exact: undo it on both copies
                _restore(shrunk, backup)
                for n, p in masked_params.items():
                    p.copy_(saved[n])
            elif reason is not None:
                _restore(shrunk, backup)
                for n, p in masked_params.items():
                    p.copy_(saved[n])
                self.groups.remove(group)
                ops = ", ".join(f"{m.name} ({type(m.module).__name__})" for m in group.members)
                self.skipped[group.root] = f"{reason}; members: {ops}"[:400]
        self.by_root = {g.root: g for g in self.groups}

    def _add_heads(self, given: Sequence[AttentionSpec], covered: set[str], modules: dict[str, nn.Module]) -> None:
        """Replace the channel groups of every attention block's q/k/v projections by one group of whole heads.

        Blocks come from :func:`~prunekit.channels.heads.find_attention` and from ``given`` (which wins for the
        same module); a block with an ignored layer stays dense."""
        specs = {s.module: s for s in find_attention(self.model)}
        for spec in given:
            if not isinstance(spec, AttentionSpec):
                raise TypeError(f"attention= takes AttentionSpec entries, got {type(spec).__name__}")
            spec.check(modules)
            specs[spec.module] = spec
        self.attention = list(specs.values())
        for spec in self.attention:
            layers = {spec.q, spec.k, spec.v}
            if {spec.module, spec.out} & covered or layers & covered:
                continue
            touched = {name for g in self.groups for m in g.members if m.kind is SliceKind.OUT and m.name in layers
                       for name in (g.root,)}
            self.groups = [g for g in self.groups if g.root not in touched]
            for name in layers:
                self.skipped.pop(name, None)
            self.groups.append(_head_group(spec, modules))

    def _prune_group(self, group: ChannelGroup, idxs: Sequence[int]) -> None:
        """Remove channels ``idxs`` of ``group`` physically (heads by their own surgery, the rest by the engine)."""
        if group.heads is not None:
            shrink_heads_(self.model, group.heads, list(idxs))
        else:
            group._tp_group.prune(idxs=list(idxs), record_history=False)

    def _wrap(self, g) -> ChannelGroup | None:
        root_module = g[0].dep.target.module
        root = self._names.get(root_module, str(root_module))
        size = len(g[0].idxs)
        members: list[GroupMember] = []
        for item in g.items:
            dep = item.dep
            module = dep.target.module
            handler = dep.handler
            if not hasattr(handler, "__self__") or not isinstance(handler.__self__, tpf.BasePruningFunc):
                continue
            name = self._names.get(module)
            if name is None:  # internal op nodes (add, cat, split, ...) carry no parameters
                continue
            kind = SliceKind.OUT if handler.__name__ == "prune_out_channels" else SliceKind.IN
            if any(r is None for r in item.root_idxs):  # e.g. channels repeated (repeat_interleave, expand)
                self.skipped[root] = (f"coupled to {name} ({type(module).__name__}) through an op that repeats "
                                      "channels, which the engine cannot map back to the group")
                return None
            slices = _member_slices(name, module, handler, dep.target.pruning_dim, list(item.idxs),
                                    list(item.root_idxs), self.residual)
            if isinstance(slices, str):
                self.skipped[root] = f"coupled to {name} ({type(module).__name__}): {slices}"
                return None
            members.append(GroupMember(name, module, kind, handler.__name__, list(item.idxs), list(item.root_idxs),
                                       slices))
        if not any(m.kind is SliceKind.OUT for m in members):
            return None
        exact = not any(isinstance(m.module, nn.LayerNorm) for m in members)
        return ChannelGroup(root=root, size=size, members=members, _tp_group=g, exact=exact)

    # ------------------------------------------------------------------------------------------- applying

    def _check_plan(self, plan: ChannelPlan) -> None:
        for root, idxs in plan.removed.items():
            if root not in self.by_root:
                why = self.skipped.get(root, "it is not the root of a prunable group (or is ignored)")
                raise ValueError(f"plan names {root!r}, which cannot be pruned: {why}")
            size = self.by_root[root].size
            if idxs[-1] >= size:
                raise ValueError(f"plan removes channel {idxs[-1]} of {root!r}, which has {size} channels")
            if len(idxs) >= size:
                raise ValueError(f"plan removes all {size} channels of {root!r}; at least one must stay")
            group = self.by_root[root]
            if group.tied:
                chosen = set(idxs)
                split = [u for u in group.units if chosen & set(u) and not set(u) <= chosen]
                if split and group.heads is not None:
                    raise ValueError(f"plan removes only part of a head of {root!r} (channels {split[0][0]}.."
                                     f"{split[0][-1]}); attention heads go whole")
                if split:
                    raise ValueError(f"plan removes only part of the tied channels {split[0]} of {root!r} (a grouped "
                                     "convolution needs the same positions removed from every group)")

    def masks(self, plan: ChannelPlan) -> dict[str, torch.Tensor]:
        """Per parameter name, a 0/1 tensor of its shape that is 0 on the slices the plan removes."""
        self._check_plan(plan)
        params = dict(self.model.named_parameters())
        out: dict[str, torch.Tensor] = {}
        for root, idxs in plan.removed.items():
            removed = torch.zeros(self.by_root[root].size, dtype=torch.bool)
            removed[list(idxs)] = True
            for s in self.by_root[root].slices():
                hit = s.idxs[removed[s.root_idxs]]
                if len(hit) == 0:
                    continue
                mask = out.setdefault(s.name, torch.ones_like(params[s.name], dtype=torch.float32))
                s.zero_(mask, hit)
        return out

    @torch.no_grad()
    def apply_masks_(self, plan: ChannelPlan) -> None:
        """Zero every slice the plan removes (shapes kept)."""
        params = dict(self.model.named_parameters())
        for name, mask in self.masks(plan).items():
            params[name].mul_(mask.to(params[name].dtype))

    @torch.no_grad()
    def shrink_(self, plan: ChannelPlan, verify: bool = True, atol: float = 1e-5) -> None:
        """Remove the plan's channels physically, in place.

        With ``verify``, the shrunk model's outputs are compared with the masked model's on the example inputs
        (tolerance ``atol``, relative to the output scale when outputs exceed 1);
        on a mismatch the model is restored and :class:`UnsupportedModelError` names the first group at fault.
        Groups that are not exact (the residual stream through LayerNorm, only with ``residual=True``) are removed
        after that check; how much they change the outputs is left in :attr:`output_change` (``max_abs`` and
        ``relative`` to the output scale) for the caller to report.
        The graph is spent afterwards (build a new one to prune again).
        """
        self._check_plan(plan)
        exact = ChannelPlan({r: i for r, i in plan.removed.items() if self.by_root[r].exact})
        inexact = ChannelPlan({r: i for r, i in plan.removed.items() if not self.by_root[r].exact})
        reference = None
        if verify:
            masked = copy.deepcopy(self.model).eval()
            ChannelGraph._apply_masks_by_name(masked, self.masks(exact))
            reference = call_model(masked, self.example_inputs)
        backup = _snapshot(self.model)
        was_training = self.model.training
        try:
            for root, idxs in exact.removed.items():
                self._prune_group(self.by_root[root], idxs)
            if verify:
                with torch.no_grad():
                    got = call_model(self.model.eval(), self.example_inputs)
                self.model.train(was_training)
                ok, diff = outputs_match(got, reference, atol)
                if not ok:
                    raise _Mismatch(diff)
            if inexact:
                with torch.no_grad():
                    before = call_model(self.model.eval(), self.example_inputs)
                    for root, idxs in inexact.removed.items():
                        self._prune_group(self.by_root[root], idxs)
                    change, scale = output_difference(call_model(self.model, self.example_inputs), before)
                self.model.train(was_training)
                self.output_change = {"max_abs": change, "relative": change / max(scale, 1e-12)}
        except BaseException as exc:
            self.model.train(was_training)
            _restore(self.model, backup)
            if isinstance(exc, _Mismatch):
                raise UnsupportedModelError(f"{self._explain_mismatch(exact, exc.diff)}; the model was restored") \
                    from None
            if isinstance(exc, (RuntimeError, ValueError, IndexError, AttributeError, TypeError)):
                raise UnsupportedModelError(
                    f"shrinking broke the forward pass ({exc.__class__.__name__}: {exc}); the model was restored. "
                    f"{self._explain_mismatch(exact, float('nan'))}") from None
            raise

    def change(self, plan: ChannelPlan, ignore: Sequence[str] = ()) -> dict[str, Any]:
        """The replayable record of shrinking by ``plan`` with this graph's settings: the plan, the user's
        ``ignore`` (the output layers are found again on replay), the residual opt-in and any attention blocks
        given by hand, so a fresh model rebuilds the same groups."""
        out = plan.to_dict()
        if ignore:
            out["ignore"] = list(ignore)
        if self.residual:
            out["residual"] = True
        if self._given:
            out["attention"] = [spec.to_dict() for spec in self._given]
        return out

    @staticmethod
    def _apply_masks_by_name(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
        params = dict(model.named_parameters())
        for name, mask in masks.items():
            params[name].mul_(mask.to(params[name].dtype))

    def _explain_mismatch(self, plan: ChannelPlan, diff: float) -> str:
        culprit = None
        for root in plan.removed:
            one = ChannelPlan({root: plan.removed[root]})
            trial = copy.deepcopy(self.model).eval()
            graph = ChannelGraph(trial, self.example_inputs, self.ignore, probe=False, attention=self._given,
                                 residual=self.residual)
            masked = copy.deepcopy(trial)
            ChannelGraph._apply_masks_by_name(masked, graph.masks(one))
            ref = call_model(masked, self.example_inputs)
            try:
                for r, idxs in one.removed.items():
                    graph._prune_group(graph.by_root[r], idxs)
                ok = outputs_match(call_model(trial, self.example_inputs), ref, 1e-5)[0]
            except Exception:  # noqa: BLE001
                ok = False
            if not ok:
                culprit = self.by_root[root]
                break
        where = f" in group {culprit.describe()}" if culprit else ""
        ops = "; ".join(sorted({m.op + " on " + type(m.module).__name__ for m in culprit.members})) if culprit else ""
        how = f"ignore=[{culprit.root!r}]" if culprit else "ignore=[...] naming the groups involved"
        return (f"removing channels{where} changes the model's outputs by {diff:.3g} beyond masking them; an op "
                f"between these layers is not channel-preserving{f' ({ops[:300]})' if ops else ''}. Supported: "
                "conv, linear, batch/instance norm, element-wise ops, add, cat, split, pooling, flatten. Exclude "
                f"the group with {how}")

    def to_json(self) -> str:
        return json.dumps({"groups": [g.describe() for g in self.groups], "skipped": self.skipped}, indent=1)


def _snapshot(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Every module's attributes (parameter/buffer/child dicts copied), for an in-place rollback."""
    return {n: {k: dict(v) if k in ("_parameters", "_buffers", "_modules") else v for k, v in m.__dict__.items()}
            for n, m in model.named_modules()}


def _restore(model: nn.Module, snapshot: dict[str, dict[str, Any]]) -> None:
    modules = dict(model.named_modules())
    for n, attrs in snapshot.items():
        modules[n].__dict__.clear()
        modules[n].__dict__.update(attrs)


class _Mismatch(Exception):
    def __init__(self, diff: float) -> None:
        super().__init__(diff)
        self.diff = diff
