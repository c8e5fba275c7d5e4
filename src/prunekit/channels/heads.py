"""Attention heads as channel groups: whole heads leave together, exactly.

A head ``h`` of an attention block is the rows ``h*d .. (h+1)*d`` of its query, key and value projections and the
same columns of its output projection (``d`` the head size). Removing them equals masking them: a head whose
value rows are zero adds nothing to the output projection, whatever its softmax. Grouped-query attention
(Ainslie et al. 2023, arXiv 2305.13245) shares one key/value head among ``r = heads / kv_heads`` query heads, so
the unit removed is a key/value head with its ``r`` query heads, and the ratio ``r`` is kept.

Heads are found from module attributes (:func:`find_attention`): an attention module holds a head count
(``num_heads``, ``heads``, ``num_attention_heads``, ...), its q/k/v projections as separate ``Linear`` children
(``q/k/v``, ``query/key/value``, ``q_proj/k_proj/v_proj``) or one fused one (``qkv``), and an output projection
(``proj``, ``out_proj``, ``o_proj``, ``c_proj``; Hugging Face's BERT/ViT keep it beside the module, in
``output.dense`` of the parent). ``nn.MultiheadAttention`` (its fused ``in_proj_weight``) is found too; since its
q/k/v width is tied to its input width, removing heads replaces it by the equivalent
:class:`~prunekit.models.attention.PrunableMultiheadAttention`. Anything else is named by the user with
:class:`AttentionSpec`.

After shrinking, every integer attribute of the attention module that held the head count, the key/value head
count or the inner width (``all_head_size``) is updated, so the module's own forward still runs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

HEAD_COUNT_ATTRS = ("num_heads", "heads", "num_attention_heads", "n_heads", "n_head")
KV_HEAD_COUNT_ATTRS = ("num_key_value_heads", "num_kv_heads", "kv_heads", "n_kv_heads")
HEAD_SIZE_ATTRS = ("head_dim", "attention_head_size", "head_size")
INNER_WIDTH_ATTRS = ("all_head_size", "inner_dim")
SEPARATE_PROJECTIONS = (("q", "k", "v"), ("query", "key", "value"), ("q_proj", "k_proj", "v_proj"))
FUSED_PROJECTIONS = ("qkv", "Wqkv")
OUTPUT_PROJECTIONS = ("proj", "out_proj", "o_proj", "c_proj")


@dataclass(frozen=True)
class AttentionSpec:
    """Where one attention block keeps its heads (module names as in ``model.named_modules()``).

    Args:
        module: The attention module; its head-count attributes are updated after shrinking.
        q, k, v: The query, key and value ``Linear`` layers; the same name three times for a fused projection
            whose rows are ``[q; k; v]``.
        out: The output projection ``Linear`` (reads the concatenated heads).
        num_heads: Query heads.
        head_dim: Size of one head.
        num_kv_heads: Key/value heads (grouped-query attention); ``None`` means ``num_heads``.
        head_count_attrs: Attributes of ``module`` that hold the query head count besides the conventional
            names (``num_heads``, ``heads``, ...); they are updated after shrinking so its forward still runs.
    """

    module: str
    q: str
    k: str
    v: str
    out: str
    num_heads: int
    head_dim: int
    num_kv_heads: int | None = None
    head_count_attrs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "head_count_attrs", tuple(self.head_count_attrs))
        if not all(isinstance(a, str) and a.isidentifier() for a in self.head_count_attrs):
            raise ValueError(f"AttentionSpec.head_count_attrs must be attribute names, got {self.head_count_attrs!r}")
        for name in ("num_heads", "head_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"AttentionSpec.{name} must be a positive int, got {value!r}")
        kv = self.num_heads if self.num_kv_heads is None else self.num_kv_heads
        if isinstance(kv, bool) or not isinstance(kv, int) or kv < 1 or self.num_heads % kv:
            raise ValueError(f"AttentionSpec.num_kv_heads must divide num_heads={self.num_heads}, got {kv!r}")
        object.__setattr__(self, "num_kv_heads", kv)
        fused = {self.q, self.k, self.v}
        if len(fused) == 2:
            raise ValueError(f"q, k and v must be three layers or one fused layer, got {self.q!r}, {self.k!r}, "
                             f"{self.v!r}")

    @property
    def fused(self) -> bool:
        return self.q == self.k == self.v

    @property
    def group_size(self) -> int:
        """Query heads per key/value head."""
        return self.num_heads // self.num_kv_heads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AttentionSpec:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown AttentionSpec fields {unknown}; accepted: {sorted(known)}")
        missing = sorted({"module", "q", "k", "v", "out", "num_heads", "head_dim"} - set(data))
        if missing:
            raise ValueError(f"AttentionSpec lacks {missing}")
        return cls(**data)

    def check(self, modules: dict[str, nn.Module]) -> None:
        """Raise ``ValueError`` unless the named layers exist and their widths agree with the head counts."""
        for role in ("module", "q", "k", "v", "out"):
            if getattr(self, role) not in modules:
                raise ValueError(f"attention {self.module!r}: {role}={getattr(self, role)!r} is not a module of the "
                                 "model")
        mha = isinstance(modules[self.module], nn.MultiheadAttention)
        if mha and not (self.fused and self.q == self.module and modules[self.module]._qkv_same_embed_dim):
            raise ValueError(f"attention {self.module!r}: an nn.MultiheadAttention is its own fused q/k/v "
                             f"(q=k=v={self.module!r}) and needs equal query/key/value widths")
        for role in ("q", "k", "v", "out"):
            if mha and role != "out":
                continue
            if not isinstance(modules[getattr(self, role)], nn.Linear):
                raise ValueError(f"attention {self.module!r}: {role}={getattr(self, role)!r} is a "
                                 f"{type(modules[getattr(self, role)]).__name__}, not nn.Linear")
        q_width, kv_width = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if self.fused:
            widths = {"qkv": (projection(self, "q", modules)[0][1].shape[0], q_width + 2 * kv_width)}
        else:
            widths = {"q": (modules[self.q].out_features, q_width), "k": (modules[self.k].out_features, kv_width),
                      "v": (modules[self.v].out_features, kv_width)}
        widths["out (in_features)"] = (modules[self.out].in_features, q_width)
        bad = {role: got for role, (got, want) in widths.items() if got != want}
        if bad:
            raise ValueError(f"attention {self.module!r}: widths {bad} do not match {self.num_heads} heads of "
                             f"{self.head_dim} ({self.num_kv_heads} key/value heads)")


def _int_attr(module: nn.Module, names: tuple[str, ...]) -> int | None:
    for name in names:
        value = getattr(module, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def projection(spec: AttentionSpec, role: str, modules: dict[str, nn.Module]
               ) -> tuple[tuple[str, torch.Tensor], tuple[str, torch.Tensor] | None]:
    """(name, tensor) of the weight of one projection role (``q``, ``k``, ``v``, ``out``) and of its bias (or
    ``None``); an ``nn.MultiheadAttention`` keeps q/k/v in ``in_proj_weight``/``in_proj_bias``."""
    name = getattr(spec, role)
    module = modules[name]
    if isinstance(module, nn.MultiheadAttention):
        bias = module.in_proj_bias
        return (f"{name}.in_proj_weight", module.in_proj_weight), \
            (None if bias is None else (f"{name}.in_proj_bias", bias))
    return (f"{name}.weight", module.weight), (None if module.bias is None else (f"{name}.bias", module.bias))


def _spec_of(name: str, module: nn.Module, modules: dict[str, nn.Module]) -> AttentionSpec | None:
    if isinstance(module, nn.MultiheadAttention):
        if not module._qkv_same_embed_dim or module.bias_k is not None or module.add_zero_attn:
            return None
        return AttentionSpec(name, name, name, name, f"{name}.out_proj", module.num_heads, module.head_dim)
    heads = _int_attr(module, HEAD_COUNT_ATTRS)
    if heads is None:
        return None
    prefix = f"{name}." if name else ""
    children = dict(module.named_children())
    qkv = next((names for names in SEPARATE_PROJECTIONS
                if all(isinstance(children.get(n), nn.Linear) for n in names)), None)
    if qkv is None:
        fused = next((n for n in FUSED_PROJECTIONS if isinstance(children.get(n), nn.Linear)), None)
        if fused is None:
            return None
        qkv = (fused, fused, fused)
    out = next((n for n in OUTPUT_PROJECTIONS if isinstance(children.get(n), nn.Linear)), None)
    if out is not None:
        out_name = prefix + out
    else:  # Hugging Face BERT/ViT: <parent>.self holds q/k/v, <parent>.output.dense the output projection
        parent = name.rpartition(".")[0]
        out_name = f"{parent}.output.dense" if parent else "output.dense"
        if not isinstance(modules.get(out_name), nn.Linear):
            return None
    q = children[qkv[0]]
    kv_heads = _int_attr(module, KV_HEAD_COUNT_ATTRS) or heads
    head_dim = _int_attr(module, HEAD_SIZE_ATTRS)
    if head_dim is None:
        width = q.out_features if qkv[0] != qkv[1] else q.out_features * heads // (heads + 2 * kv_heads)
        head_dim = width // heads
    try:
        return AttentionSpec(name, prefix + qkv[0], prefix + qkv[1], prefix + qkv[2], out_name, heads, head_dim,
                             kv_heads)
    except ValueError:
        return None


def find_attention(model: nn.Module) -> list[AttentionSpec]:
    """Every attention block of ``model`` whose heads its module attributes describe (see the module docstring);
    blocks whose layer widths disagree with their attributes are left out."""
    modules = dict(model.named_modules())
    found = []
    for name, module in modules.items():
        spec = _spec_of(name, module, modules)
        if spec is None:
            continue
        try:
            spec.check(modules)
        except ValueError:
            continue
        found.append(spec)
    return found


# ------------------------------------------------------------------------------------- rows of each head


def head_rows(spec: AttentionSpec) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per role (``q``, ``k``, ``v``, ``out``): (rows or columns of that layer, the query channel each belongs to).

    The group's channels are the query projection's rows; a key/value row of head ``g`` maps onto the channels
    of the first query head it serves, so a unit (a key/value head with its query heads) holds them all."""
    d, r = spec.head_dim, spec.group_size
    q_idx = torch.arange(spec.num_heads * d)
    kv = torch.arange(spec.num_kv_heads * d)
    kv_root = (kv // d) * r * d + kv % d
    q_offset = 0
    k_offset = spec.num_heads * d if spec.fused else 0
    v_offset = k_offset + spec.num_kv_heads * d if spec.fused else 0
    return {"q": (q_idx + q_offset, q_idx), "k": (kv + k_offset, kv_root), "v": (kv + v_offset, kv_root),
            "out": (q_idx, q_idx)}


def head_units(spec: AttentionSpec) -> list[tuple[int, ...]]:
    """The group's units: each key/value head's query channels (one head each without grouped-query attention)."""
    span = spec.group_size * spec.head_dim
    return [tuple(range(g * span, (g + 1) * span)) for g in range(spec.num_kv_heads)]


def removed_kv_heads(spec: AttentionSpec, channels: list[int] | tuple[int, ...]) -> list[int]:
    """The key/value heads a set of removed query channels takes (whole units only)."""
    span = spec.group_size * spec.head_dim
    heads = sorted({c // span for c in channels})
    partial = [g for g in heads if sum(1 for c in channels if c // span == g) != span]
    if partial:
        raise ValueError(f"attention {spec.module!r}: a plan must remove whole heads ({span} channels each), "
                         f"head(s) {partial} are only partly removed")
    return heads


@torch.no_grad()
def shrink_heads_(model: nn.Module, spec: AttentionSpec, channels: list[int] | tuple[int, ...]) -> AttentionSpec:
    """Remove the heads holding ``channels`` physically; return the spec of what is left.

    Rows of q/k/v (and their biases) and columns of the output projection go; the attention module's head
    counts and inner width are updated so its forward runs unchanged."""
    modules = dict(model.named_modules())
    gone = set(removed_kv_heads(spec, channels))
    if len(gone) >= spec.num_kv_heads:
        raise ValueError(f"attention {spec.module!r}: a plan cannot remove all {spec.num_kv_heads} heads")
    if isinstance(modules[spec.module], nn.MultiheadAttention):
        spec = _to_prunable_(model, spec, modules)
        modules = dict(model.named_modules())
    d, r = spec.head_dim, spec.group_size
    keep_kv = [g for g in range(spec.num_kv_heads) if g not in gone]
    q_keep = torch.tensor([(g * r + i) * d + j for g in keep_kv for i in range(r) for j in range(d)])
    kv_keep = torch.tensor([g * d + j for g in keep_kv for j in range(d)])
    if spec.fused:
        q_width, kv_width = spec.num_heads * d, spec.num_kv_heads * d
        _keep_rows_(modules[spec.q], torch.cat([q_keep, q_width + kv_keep, q_width + kv_width + kv_keep]))
    else:
        _keep_rows_(modules[spec.q], q_keep)
        _keep_rows_(modules[spec.k], kv_keep)
        _keep_rows_(modules[spec.v], kv_keep)
    out = modules[spec.out]
    out.weight = nn.Parameter(out.weight.index_select(1, q_keep.to(out.weight.device)).contiguous(),
                              requires_grad=out.weight.requires_grad)
    out.in_features = len(q_keep)
    attention = modules[spec.module]
    if isinstance(getattr(attention, "source_heads", None), tuple):
        attention.source_heads = tuple(attention.source_heads[h] for g in keep_kv for h in range(g * r, (g + 1) * r))
    new = AttentionSpec(spec.module, spec.q, spec.k, spec.v, spec.out, len(keep_kv) * r, d, len(keep_kv),
                        spec.head_count_attrs)
    attention = modules[spec.module]
    for names, old, value in ((HEAD_COUNT_ATTRS + spec.head_count_attrs, spec.num_heads, new.num_heads),
                              (KV_HEAD_COUNT_ATTRS, spec.num_kv_heads, new.num_kv_heads),
                              (INNER_WIDTH_ATTRS, spec.num_heads * d, new.num_heads * d)):
        for attr in names:
            current = getattr(attention, attr, None)
            if isinstance(current, int) and not isinstance(current, bool) and current == old:
                setattr(attention, attr, value)
    return new


def _to_prunable_(model: nn.Module, spec: AttentionSpec, modules: dict[str, nn.Module]) -> AttentionSpec:
    """Put the exact :class:`PrunableMultiheadAttention` in place of an ``nn.MultiheadAttention``; its spec."""
    from prunekit.models.attention import PrunableMultiheadAttention

    parent_name, _, child = spec.module.rpartition(".")
    parent = modules[parent_name] if parent_name else model
    setattr(parent, child, PrunableMultiheadAttention.from_torch(modules[spec.module]))
    m = spec.module
    return AttentionSpec(m, f"{m}.q_proj", f"{m}.k_proj", f"{m}.v_proj", f"{m}.out_proj", spec.num_heads,
                         spec.head_dim, spec.num_kv_heads, spec.head_count_attrs)


def _keep_rows_(layer: nn.Linear, rows: torch.Tensor) -> None:
    rows = rows.to(layer.weight.device)
    layer.weight = nn.Parameter(layer.weight.index_select(0, rows).contiguous(),
                                requires_grad=layer.weight.requires_grad)
    if layer.bias is not None:
        layer.bias = nn.Parameter(layer.bias.index_select(0, rows).contiguous(), requires_grad=layer.bias.requires_grad)
    layer.out_features = len(rows)
