"""EigenDamage: structured pruning in the Kronecker-factored eigenbasis (Wang et al. 2019, arXiv 1905.05934).

With K-FAC factors ``A = Q_A diag(lambda_A) Q_A^T`` (channel form for convolutions) and
``G = Q_G diag(lambda_G) Q_G^T``, a layer's weight is rotated into the eigenbasis, per kernel offset ``o``:
``W*_o = Q_G^T W_o Q_A``. There the Fisher is (approximately) diagonal, so the loss increase of zeroing an entry
is ``(W*_ij)^2 lambda_G_i lambda_A_j / 2`` summed over offsets; an output direction ``i`` scores its row sum, an
input direction ``j`` its column sum. One global threshold over all directions of all layers (with a per-layer
cap) meets a FLOPs or parameter target, and each layer is rebuilt as a bottleneck
``1x1 (Q_A kept columns)^T -> k x k core W*[kept, kept] -> 1x1 Q_G[:, kept]`` (the bias on the last), only where
that makes it smaller. The output width is unchanged, so BatchNorm and residual connections need no surgery.

The depthwise-separable variant replaces the core by a depthwise k x k convolution: each kept input direction's
kernels ``W*[:, j, :]`` are reduced to their best rank-1 approximation ``u_j v_j^T`` (SVD), the ``v_j`` become
the depthwise kernels and the ``u_j`` are merged into the output projection ``Q_G U``.

In iterative pruning the next round collects statistics on the core, decomposes it the same way and merges the new
rotations into the projections, so every layer stays three deep.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from prunekit.channels.graph import find_output_layers, ignored_modules
from prunekit.channels.model_io import call_model, first_examples
from prunekit.configs import Config, coerce_fields
from prunekit.curvature.kfac import ConvFactor, CurvatureConfig, FisherSettings, collect_kfac, kfac_support
from prunekit.measurement.latency_table import LatencySettings, LatencyTable, LayerState
from prunekit.measurement.metrics import count_flops, count_params
from prunekit.methods.registry import MethodSpec, PruneRecord, register
from prunekit.planning.allocation import (
    InfeasibleTargetError,
    RankedLayer,
    Target,
    TargetMetric,
    check_latency_settings_use,
    remove_lowest,
)
from prunekit.planning.schedule import RoundSchedule


class BottleneckForm(str, enum.Enum):
    """How a pruned layer is rebuilt."""

    STANDARD = "standard"  # 1x1 -> k x k core -> 1x1
    DEPTHWISE = "depthwise"  # 1x1 -> depthwise k x k -> 1x1 (core's rank-1 factors merged into the projection)


@dataclass(frozen=True)
class EigenDamageConfig(Config):
    """EigenDamage settings.

    Args:
        target: Keep this fraction of the FLOPs, parameters or measured latency (``flops=0.25``, ``latency=x2``;
            directions are not channels).
        max_per_layer: Largest fraction of a layer's input or output directions removed, counted against the dense
            layer's width over all rounds (so iterative rounds cannot compound past it).
        schedule: Rounds of prune, recover and fine-tune (1 = one-shot); later rounds decompose the cores again.
        ignore: Modules to leave alone, containers included (the output layer always is).
        curvature: Fisher type, batches and damping of the K-FAC statistics (channel input factors).
        form: :class:`BottleneckForm` of the rebuilt layers (the depthwise form is applied in the last round).
        train_rotations: Fine-tune the projections (the eigenbases) with the core; ``False`` freezes them.
        bn_images: Training images for BatchNorm re-estimation after each round (0 = off).
        finetune_epochs: Fine-tuning epochs after each round (best epoch on validation).
        latency: Engine, batch and threads a ``latency=`` target is measured with (a bottleneck costs its two 1x1
            projections and its core, each measured at the ranks it keeps).
    """

    target: Target = Target(TargetMetric.FLOPS, 0.5)
    max_per_layer: float = 0.9
    schedule: RoundSchedule = RoundSchedule()
    ignore: tuple[str, ...] = ()
    curvature: FisherSettings = FisherSettings()
    form: BottleneckForm = BottleneckForm.STANDARD
    train_rotations: bool = True
    bn_images: int = 512
    finetune_epochs: int = 0
    latency: LatencySettings = LatencySettings()

    def __post_init__(self) -> None:
        coerce_fields(self)
        check_latency_settings_use(self.target, self.latency)
        if self.latency.corrections != LatencySettings().corrections:
            raise ValueError("--latency-corrections applies to the channel methods; eigendamage plans its ranks by the "
                             "latency table alone")
        if self.target.metric is TargetMetric.LATENCY and self.form is BottleneckForm.DEPTHWISE:
            raise ValueError("latency= targets cost the standard bottleneck form (the latency table has no "
                             "depthwise cores); use --form standard, or a flops= target with --form depthwise")
        if not isinstance(self.train_rotations, bool):
            raise ValueError(f"train_rotations must be true or false, got {self.train_rotations!r}")
        if self.target.metric is TargetMetric.CHANNELS:
            raise ValueError("eigendamage removes eigen-directions, not channels: give a flops=, params= or latency= "
                             "target")
        if not isinstance(self.max_per_layer, (int, float)) or not 0 < self.max_per_layer < 1:
            raise ValueError(f"max_per_layer must be in (0, 1), got {self.max_per_layer!r}")
        object.__setattr__(self, "ignore", tuple(self.ignore))
        for name in ("bn_images", "finetune_epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")


@dataclass(frozen=True)
class LayerSpec:
    """What a layer computes, independent of how it is factored: enough to rebuild it."""

    kind: str  # "conv" or "linear"
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    bias: bool = True

    @classmethod
    def of(cls, module: nn.Module) -> LayerSpec:
        if isinstance(module, KFEBottleneck):
            return module.spec
        if isinstance(module, nn.Conv2d):
            return cls("conv", module.in_channels, module.out_channels, tuple(module.kernel_size),
                       tuple(module.stride), tuple(module.padding), tuple(module.dilation), module.bias is not None)
        return cls("linear", module.in_features, module.out_features, bias=module.bias is not None)

    @property
    def kernel_numel(self) -> int:
        return self.kernel_size[0] * self.kernel_size[1]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride), "padding": list(self.padding),
                "dilation": list(self.dilation), "bias": self.bias}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerSpec:
        return cls(data["kind"], data["in_channels"], data["out_channels"], tuple(data["kernel_size"]),
                   tuple(data["stride"]), tuple(data["padding"]), tuple(data["dilation"]), data["bias"])


class KFEBottleneck(nn.Module):
    """A layer re-parameterised in its Kronecker-factored eigenbasis: ``project_out(core(project_in(x)))``.

    ``project_in`` (``in -> rank_in``, no bias) and ``project_out`` (``-> out``, with the layer's bias) are 1x1
    convolutions (or Linear layers); ``core`` is the ``rank_in -> rank_out`` k x k convolution with the layer's
    stride, padding and dilation, or, in the depthwise form, a depthwise k x k convolution on ``rank_in`` channels.
    """

    def __init__(self, spec: LayerSpec, rank_in: int, rank_out: int,
                 form: BottleneckForm = BottleneckForm.STANDARD) -> None:
        super().__init__()
        if rank_in < 1 or rank_out < 1:
            raise ValueError(f"bottleneck ranks must be >= 1, got rank_in={rank_in}, rank_out={rank_out}")
        self.spec, self.form = spec, BottleneckForm(form)
        self.rank_in = rank_in
        self.rank_out = rank_in if self.form is BottleneckForm.DEPTHWISE else rank_out
        if spec.kind == "linear":
            if self.form is BottleneckForm.DEPTHWISE:
                raise ValueError("the depthwise form needs a convolution; Linear layers use the standard form")
            self.project_in = nn.Linear(spec.in_channels, rank_in, bias=False)
            self.core = nn.Linear(rank_in, rank_out, bias=False)
            self.project_out = nn.Linear(rank_out, spec.out_channels, bias=spec.bias)
            return
        self.project_in = nn.Conv2d(spec.in_channels, rank_in, 1, bias=False)
        groups = rank_in if self.form is BottleneckForm.DEPTHWISE else 1
        self.core = nn.Conv2d(rank_in, self.rank_out, spec.kernel_size, spec.stride, spec.padding, spec.dilation,
                              groups=groups, bias=False)
        self.project_out = nn.Conv2d(self.rank_out, spec.out_channels, 1, bias=spec.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project_out(self.core(self.project_in(x)))

    def extra_repr(self) -> str:
        return f"rank_in={self.rank_in}, rank_out={self.rank_out}, form={self.form.value}"


def layer_cost(spec: LayerSpec, positions_in: int, positions_out: int, ranks: tuple[int, int] | None,
               form: BottleneckForm, metric: TargetMetric) -> float:
    """FLOPs (2 x multiply-adds, per example) or parameters of a layer, dense (``ranks=None``) or factored."""
    k = spec.kernel_numel
    bias = spec.out_channels if spec.bias else 0
    if ranks is None:
        weights = spec.in_channels * spec.out_channels * k
        return float(weights + bias) if metric is TargetMetric.PARAMS else 2.0 * weights * positions_out
    r_in, r_out = ranks
    if form is BottleneckForm.DEPTHWISE:
        sizes = (spec.in_channels * r_in, r_in * k, r_in * spec.out_channels)
    else:
        sizes = (spec.in_channels * r_in, r_in * r_out * k, r_out * spec.out_channels)
    if metric is TargetMetric.PARAMS:
        return float(sum(sizes) + bias)
    return 2.0 * (sizes[0] * positions_in + sizes[1] * positions_out + sizes[2] * positions_out)


@dataclass
class _Layer:
    """One prunable layer: its eigen-decomposition, scores and where it runs."""

    name: str
    spec: LayerSpec
    positions_in: int
    positions_out: int
    weight: torch.Tensor  # (out, in, k) in the original coordinates of what is decomposed (a core: its own)
    q_in: torch.Tensor  # Q_A (in x in)
    q_out: torch.Tensor  # Q_G (out x out)
    rotated: torch.Tensor  # W* (out, in, k)
    score_in: torch.Tensor
    score_out: torch.Tensor
    base: KFEBottleneck | None  # an existing bottleneck whose core is re-decomposed (iterative rounds)


def _find_layers(model: nn.Module, example: torch.Tensor, ignore: Iterable[str]) -> dict[str, tuple[str, nn.Module]]:
    """layer name -> (name of the module statistics are collected on, that module)."""
    skip = ignored_modules(model, list(ignore)) | set(find_output_layers(model, example))
    inside = {f"{n}.{c}" for n, m in model.named_modules() if isinstance(m, KFEBottleneck) for c, _ in
              m.named_modules() if c}
    found = {}
    for name, module in model.named_modules():
        if name in skip or name in inside or not name:
            continue
        if isinstance(module, KFEBottleneck):
            if module.form is BottleneckForm.STANDARD:
                found[name] = (f"{name}.core", module.core)
        elif isinstance(module, (nn.Linear, nn.Conv2d)) and kfac_support(module) is None:
            found[name] = (name, module)
    return found


def _positions(model: nn.Module, example: torch.Tensor, modules: dict[str, nn.Module]) -> dict[str, tuple[int, int]]:
    """(input positions, output positions) per example for each named module (spatial size, or tokens)."""
    shapes: dict[str, tuple[int, int]] = {}

    def hook(name):
        def record(module, args, out):
            x = args[0]
            if isinstance(module, nn.Conv2d):
                shapes[name] = (x.shape[-1] * x.shape[-2], out.shape[-1] * out.shape[-2])
            else:
                t = x.numel() // (x.shape[0] * x.shape[-1])
                shapes[name] = (t, t)
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    was_training = model.training
    try:  # eval: one example through a train-mode BatchNorm would fail at 1x1 and move the running statistics
        with torch.no_grad():
            call_model(model.eval(), first_examples(example))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return shapes


def _decompose(name: str, stats_module: nn.Module, factors, base: KFEBottleneck | None,
               outer: nn.Module, positions: tuple[int, int]) -> _Layer:
    la, qa, lg, qg = factors.eigh()
    w = stats_module.weight.detach().double().cpu()
    w = w.reshape(w.shape[0], w.shape[1], -1)
    rotated = torch.einsum("oi,ijk,jl->olk", qg.T, w, qa)
    s = rotated.pow(2).sum(2) * torch.outer(lg, la) / 2
    spec = LayerSpec.of(outer)
    return _Layer(name, spec, positions[0], positions[1], w, qa, qg, rotated, s.sum(0), s.sum(1), base)


@dataclass
class EigenPlan:
    """Kept (input, output) directions per layer; layers not listed stay as they are."""

    kept: dict[str, tuple[torch.Tensor, torch.Tensor]]
    predicted: float  # predicted total cost after the change


LayerCost = Callable[[_Layer, "tuple[int, int] | None", BottleneckForm], float]


def counted_cost(metric: TargetMetric) -> LayerCost:
    """A layer's FLOPs or parameters, dense (``ranks=None``) or factored at the given ranks (:func:`layer_cost`)."""
    return lambda layer, ranks, form: layer_cost(layer.spec, layer.positions_in, layer.positions_out, ranks, form,
                                                 metric)


def latency_cost(table: LatencyTable) -> LayerCost:
    """A layer's share of the predicted latency (ms, the table's layer coefficient included): its measured time
    dense, or as a standard bottleneck at the given ranks (projections and core)."""
    scale = table.coefficients[0]
    if scale <= 0:
        raise ValueError("the latency table's fit gives the layers no share of the time (its calibration found the "
                         "network's latency independent of their widths), so no rank can buy speed; measure it again "
                         "with more --latency-run-time, or use a flops= target")

    def cost(layer: _Layer, ranks: tuple[int, int] | None, form: BottleneckForm) -> float:
        if ranks is None:
            return scale * table.layer_ms(layer.name, LayerState(layer.spec.in_channels, layer.spec.out_channels))
        return scale * table.layer_ms(layer.name, LayerState(ranks[0], ranks[1], bottleneck=True))
    return cost


def _plan(layers: list[_Layer], fixed_cost: float, target_cost: float, metric: TargetMetric, cap: float,
          form: BottleneckForm, cost_of: LayerCost) -> EigenPlan:
    """Remove directions in ascending score order (one global threshold, :func:`remove_lowest`) until the model
    cost meets the target."""

    def ranked(layer: _Layer) -> RankedLayer:
        def cost(ranks: tuple[int, ...]) -> float:
            """A layer changes only once a direction of it is removed (so the depthwise form, cheaper at any rank,
            is not applied to layers the threshold never reaches), and only if that makes it smaller."""
            return min(_current_cost(layer, cost_of), cost_of(layer, (ranks[0], ranks[1]), form))

        # depthwise: output directions are merged into the projection, so removing them saves nothing
        return RankedLayer(layer.name, (layer.score_in, layer.score_out), cost, _current_cost(layer, cost_of),
                           (True, form is not BottleneckForm.DEPTHWISE),
                           dense=(layer.spec.in_channels, layer.spec.out_channels))

    try:
        removed, costs, total = remove_lowest([ranked(lay) for lay in layers], fixed_cost, target_cost, cap,
                                              metric.value, "directions")
    except InfeasibleTargetError as exc:
        raise InfeasibleTargetError(f"EigenDamage {exc}") from None
    kept = {}
    for lay in layers:
        if costs[lay.name] < _current_cost(lay, cost_of):
            keep_in = torch.tensor(sorted(set(range(lay.rotated.shape[1])) - removed[lay.name][0]))
            keep_out = torch.tensor(sorted(set(range(lay.rotated.shape[0])) - removed[lay.name][1]))
            kept[lay.name] = (keep_in, keep_out)
    return EigenPlan(kept, total)


def _current_cost(layer: _Layer, cost_of: LayerCost) -> float:
    """Cost of the layer as it is now (dense, or the existing standard bottleneck)."""
    ranks = None if layer.base is None else (layer.base.rank_in, layer.base.rank_out)
    return cost_of(layer, ranks, BottleneckForm.STANDARD)


def _build(layer: _Layer, keep_in: torch.Tensor, keep_out: torch.Tensor, form: BottleneckForm,
           bias: torch.Tensor | None, like: torch.Tensor) -> KFEBottleneck:
    """The bottleneck for ``layer`` keeping the given directions (merging an existing bottleneck's projections)."""
    if form is BottleneckForm.DEPTHWISE and layer.spec.kind == "linear":
        form = BottleneckForm.STANDARD
    core = layer.rotated[keep_out][:, keep_in]  # (r_out, r_in, k)
    p_in = layer.q_in[:, keep_in].T  # (r_in, in of what was decomposed)
    p_out = layer.q_out[:, keep_out]  # (out of what was decomposed, r_out)
    if layer.base is not None:  # merge with the existing rotations: the layer stays three deep
        p_in = p_in @ layer.base.project_in.weight.detach().double().cpu().reshape(p_in.shape[1], -1)
        p_out = layer.base.project_out.weight.detach().double().cpu().reshape(-1, p_out.shape[0]) @ p_out
    r_in, r_out = len(keep_in), len(keep_out)
    module = KFEBottleneck(layer.spec, r_in, r_out, form)
    kh, kw = layer.spec.kernel_size
    with torch.no_grad():
        if form is BottleneckForm.DEPTHWISE:
            u, sv, vh = torch.linalg.svd(core.permute(1, 0, 2))  # per input direction: (r_out x k) kernels
            depth = (sv[:, :1] * vh[:, 0, :])  # (r_in, k)
            module.core.weight.copy_(depth.reshape(r_in, 1, kh, kw).to(like))
            p_out = p_out @ u[:, :, 0].T  # (out, r_out) @ (r_out, r_in)
        else:
            module.core.weight.copy_(core.reshape(module.core.weight.shape).to(like))
        module.project_in.weight.copy_(p_in.reshape(module.project_in.weight.shape).to(like))
        module.project_out.weight.copy_(p_out.reshape(module.project_out.weight.shape).to(like))
        if bias is not None:
            module.project_out.bias.copy_(bias)
    return module


def bottleneck_from_factors(module: nn.Module, factors, keep_in: torch.Tensor | None = None,
                            keep_out: torch.Tensor | None = None,
                            form: BottleneckForm = BottleneckForm.STANDARD) -> KFEBottleneck:
    """Rebuild one Linear/Conv2d layer (or the core of a bottleneck, merging) as a KFE bottleneck keeping the
    given eigen-directions (all by default: then the standard form computes exactly what the layer did).

    Args:
        factors: :class:`~prunekit.curvature.kfac.KroneckerFactors` in channel form, without a bias entry.
    """
    base = module if isinstance(module, KFEBottleneck) else None
    inner = module.core if base is not None else module
    layer = _decompose("layer", inner, factors, base, module, (1, 1))
    keep_in = torch.arange(layer.rotated.shape[1]) if keep_in is None else torch.as_tensor(keep_in)
    keep_out = torch.arange(layer.rotated.shape[0]) if keep_out is None else torch.as_tensor(keep_out)
    outer_bias = (base.project_out if base is not None else module).bias
    return _build(layer, keep_in, keep_out, BottleneckForm(form),
                  outer_bias.detach().clone() if outer_bias is not None else None, inner.weight)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


@dataclass
class EigenRound:
    """What one EigenDamage round changed: the replayable architecture change and the predicted cost."""

    change: dict[str, Any]
    predicted_keep: float
    removed_directions: int


def eigendamage_round_(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], example: torch.Tensor,
                       target: Target, curvature: CurvatureConfig, max_per_layer: float, options: EigenDamageConfig,
                       ignore: Iterable[str] = (), final: bool = True, progress: bool = False,
                       latency: LatencyTable | None = None) -> EigenRound:
    """One round of EigenDamage on ``model`` in place: statistics, global threshold, bottleneck rebuild.

    Args:
        target: Keep this fraction of the model's current FLOPs, parameters or predicted latency.
        final: Apply the depthwise form (when asked for) in this round.
        latency: The dense network's table measured with bottleneck projections, for a ``latency=`` target.

    Raises:
        InfeasibleTargetError: the target cannot be met under ``max_per_layer``.
        ValueError: channel targets (EigenDamage removes directions, not channels), no decomposable layer.
    """
    if target.metric is TargetMetric.CHANNELS:
        raise ValueError("EigenDamage targets FLOPs, parameters or latency (flops=0.25, params=0.1, latency=x2), not "
                         "channels")
    found = _find_layers(model, example, ignore)
    if not found:
        raise ValueError("EigenDamage found no Linear/Conv2d layer to decompose (output layers and ignore= are left "
                         "alone; grouped convolutions have no Kronecker-factored form)")
    modules = dict(model.named_modules())
    stats_names = {stats: name for name, (stats, _) in found.items()}
    factors = collect_kfac(model, batches, curvature, list(stats_names), conv_factor=ConvFactor.CHANNEL,
                           progress=progress)
    positions = _positions(model, example, {name: m for name, (_, m) in found.items()})
    layers = []
    for name, (stats, module) in found.items():
        if stats not in factors:
            continue
        f = factors[stats]
        if f.has_bias:  # Linear: the bias stays on the output projection, so drop A's constant entry
            f = type(f)(f.A[:-1, :-1], f.G, False, f.conv_factor, f.kernel_numel)
        base = modules[name] if isinstance(modules[name], KFEBottleneck) else None
        layers.append(_decompose(name, module, f, base, modules[name], positions[name]))
    metric = target.metric
    if metric is TargetMetric.LATENCY:
        if latency is None:
            raise ValueError("a latency= target needs the dense network's latency table measured with bottlenecks "
                             "(latency_table(model, example, settings, bottlenecks=True))")
        cost_of = latency_cost(latency)
        layers = [lay for lay in layers if lay.name in latency.layers]
        total = latency.predict_model(model)
    else:
        cost_of = counted_cost(metric)
        total = count_flops(model, first_examples(example)) if metric is TargetMetric.FLOPS else count_params(model)
    current = sum(_current_cost(lay, cost_of) for lay in layers)
    form = options.form if final else BottleneckForm.STANDARD
    plan = _plan(layers, total - current, target.keep * total, metric, max_per_layer, form, cost_of)
    change_layers = {}
    removed = 0
    like = next(model.parameters())
    for layer in layers:
        if layer.name not in plan.kept:
            continue
        keep_in, keep_out = plan.kept[layer.name]
        outer = modules[layer.name]
        bias_module = outer.project_out if isinstance(outer, KFEBottleneck) else outer
        bias = bias_module.bias.detach().clone() if bias_module.bias is not None else None
        new = _build(layer, keep_in, keep_out, form, bias, like)
        set_rotations_trainable_(new, options.train_rotations)
        _set_module(model, layer.name, new)
        removed += layer.rotated.shape[0] + layer.rotated.shape[1] - len(keep_in) - len(keep_out)
        change_layers[layer.name] = {"spec": layer.spec.to_dict(), "rank_in": new.rank_in, "rank_out": new.rank_out,
                                     "form": new.form.value}
    return EigenRound({"kind": "eigenbasis", "layers": change_layers}, plan.predicted / total, removed)


def set_rotations_trainable_(module: nn.Module, trainable: bool) -> None:
    """Freeze or unfreeze the projections (eigenbases) of every bottleneck in ``module``."""
    for m in module.modules():
        if isinstance(m, KFEBottleneck):
            m.project_in.weight.requires_grad_(trainable)
            m.project_out.weight.requires_grad_(trainable)


def replay_eigenbasis_(model: nn.Module, change: dict[str, Any], example_inputs: torch.Tensor) -> None:
    """Replace each listed layer by an (untrained) bottleneck of the recorded shape; weights are loaded after."""
    for name, entry in change["layers"].items():
        try:
            current = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"eigenbasis change names layer {name!r}, which the model does not have") from None
        spec = LayerSpec.from_dict(entry["spec"])
        if not isinstance(current, (nn.Conv2d, nn.Linear, KFEBottleneck)) or LayerSpec.of(current) != spec:
            raise ValueError(f"eigenbasis change records layer {name!r} as {spec}, but the model's layer is "
                             f"{type(current).__name__}")
        if not (1 <= int(entry["rank_in"]) <= spec.in_channels and 1 <= int(entry["rank_out"]) <= spec.out_channels):
            raise ValueError(f"eigenbasis change gives layer {name!r} ranks {entry['rank_in']}/{entry['rank_out']}, "
                             f"beyond its {spec.in_channels} inputs / {spec.out_channels} outputs")
        _set_module(model, name, KFEBottleneck(spec, int(entry["rank_in"]), int(entry["rank_out"]), entry["form"]))


def eigendamage_(model: nn.Module, data, config: EigenDamageConfig, ctx) -> PruneRecord:
    """EigenDamage on ``model`` in place: every round of ``config.schedule`` collects K-FAC statistics, removes the
    least important eigen-directions under one global threshold and rebuilds layers as bottlenecks, then
    re-estimates BatchNorm and fine-tunes (the ``apply`` of the ``eigendamage`` method)."""
    from prunekit.methods.rounds import (
        RoundStep,
        kept_widths,
        layer_widths,
        record_latency,
        run_rounds,
        score_batches,
        target_latency_table,
    )

    example = data.example_inputs()
    k = config.schedule.iterations

    def step(m: nn.Module, target: Target, r: int) -> RoundStep:
        set_rotations_trainable_(m, config.train_rotations)
        curvature = config.curvature.curvature(ctx.seed)
        done = eigendamage_round_(m, score_batches(data, curvature.batches, ctx.seed + r), example, target,
                                  curvature, config.max_per_layer, config, config.ignore, final=r == k,
                                  progress=ctx.progress, latency=table)
        return RoundStep(done.change, done.predicted_keep, done.removed_directions, "eigen-directions")

    dense_widths = layer_widths(model)
    table = target_latency_table(model, data, config.target, config.latency, ctx, config.ignore, bottlenecks=True)
    record = run_rounds(model, data, config.target, config.schedule, step, ctx, method=config.method, config=config,
                        bn_images=config.bn_images, finetune_epochs=config.finetune_epochs,
                        before_finetune=lambda m: set_rotations_trainable_(m, config.train_rotations), latency=table)
    record.kept_width = kept_widths(model, dense_widths)
    record_latency(record, model, table, config.latency, "ranks planned by the table alone (no measured correction)")
    record.notes.append(f"EigenDamage, {config.form.value} bottlenecks, at most {config.max_per_layer:.0%} of a "
                        f"layer's dense directions removed over all rounds, {k} round(s), "
                        f"{config.finetune_epochs} fine-tune epoch(s) per round, model chosen on validation")
    return record


register(MethodSpec("eigendamage", EigenDamageConfig, eigendamage_,
                    "Wang et al. 2019, EigenDamage: Structured Pruning in the Kronecker-Factored Eigenbasis, "
                    "arXiv 1905.05934",
                    "eigen-directions removed in the Kronecker-factored eigenbasis, layers rebuilt as bottlenecks"))
