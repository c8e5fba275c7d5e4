"""A latency cost model measured on this machine: per prunable layer, its latency against the widths it keeps.

Pruning to a FLOPs count does not make a network proportionally faster: fixed costs do not shrink, and kernels are
faster at some widths than others. Like ZipLM (Kurtic et al. 2023, arXiv 2302.04089) and HALP (Shen et al. 2022,
arXiv 2110.10811), prunekit can prune against latency measured per layer instead:

    predicted(widths) = a * sum_l t_l(kept_in_l, kept_out_l) + b * act(widths) + c

* ``t_l`` is the measured time of conv/linear layer ``l`` alone, on its own input size, at a grid of kept input and
  output widths (``grid`` fractions of its dense width and half the smallest, made non-decreasing in both),
  interpolated bilinearly;
  in ONNX Runtime each layer runs as a one-node graph, less the cost of an empty session call. A layer rebuilt as an
  EigenDamage bottleneck costs ``t_in(r_in) + t_l(r_in, r_out) + t_out(r_out)``, its 1x1 projections measured too.
* ``act`` is the kept fraction of the layers' output activations (what norms, activations, additions and pooling
  run on).
* ``a, b, c >= 0`` are fitted (non-negative least squares on relative errors, the dense network weighted
  ``DENSE_WEIGHT``) to the whole network measured in its inference form (BatchNorm folded; the engine's own graph)
  at ``CALIBRATION`` uniform widths: what the layers alone miss, fusion and fixed per-call costs.
* Kernels can be much slower on widths that are not a multiple of 4, 8 or 16 (ONNX Runtime's blocked layouts), so
  there is one fit per rounding of ``ROUNDINGS``, calibrated on networks whose kept widths are multiples of it; a
  plan is predicted by the fit of the rounding it was made with. ``rounding`` also records each rounding's network
  measured at equal FLOPs (``PROBE_FLOPS`` of the dense), and ``round_to`` the smallest within 3% of the fastest
  (reported; the allocation chooses per plan). EigenDamage bottlenecks are predicted with the rounding-1 fit,
  calibrated on channel-thinned networks.

A table is measured once per (layer shapes and input sizes, engine and its version, batch, threads, torch version)
and cached as JSON under ``$PRUNEKIT_CACHE/latency`` (default ``~/.cache/prunekit/latency``).
"""

from __future__ import annotations

import copy
import enum
import hashlib
import json
import os
import statistics
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from prunekit.configs import Config, coerce_fields
from prunekit.measurement.latency import check_latency_settings, paired_latency, time_ms

TABLE_FORMAT = "prunekit.latency-table/1"
CALIBRATION = (1.0, 0.8, 0.6, 0.4, 0.25)
ROUNDINGS = (1, 4, 8, 16)
PROBE_FLOPS = 0.4
DENSE_WEIGHT = 3.0


def cache_dir() -> Path:
    """Where measured tables are kept: ``$PRUNEKIT_CACHE/latency`` (default ``~/.cache/prunekit/latency``)."""
    return Path(os.environ.get("PRUNEKIT_CACHE", Path.home() / ".cache" / "prunekit")) / "latency"


class Engine(str, enum.Enum):
    """Where latency is measured."""

    EAGER = "eager"
    ONNXRUNTIME = "onnxruntime"


def check_engine(engine: Engine) -> None:
    """Refuse an engine whose packages are not installed, saying how to install them.

    Raises:
        ValueError: ``onnxruntime`` without the ``onnx``/``onnxruntime`` packages.
    """
    if engine is Engine.ONNXRUNTIME:
        for module in ("onnx", "onnxruntime"):
            try:
                __import__(module)
            except ImportError:
                raise ValueError(f"--engine onnxruntime needs the {module} package, which is not installed: "
                                 "pip install 'prunekit[onnx]', or measure with --engine eager") from None


@dataclass(frozen=True)
class LatencySettings(Config):
    """How a ``latency=`` target is measured.

    Args:
        engine: Eager PyTorch or ONNX Runtime (``pip install 'prunekit[onnx]'``), for ``latency=`` targets.
        batch: Batch size a ``latency=`` target is measured at.
        threads: Intra-op threads a ``latency=`` target is measured with (default: torch's current number).
        grid: Widths measured per layer dimension for a ``latency=`` target: 1/grid, 2/grid, ..., 1 of the dense
            and half the smallest, on multiples of 8 for a width that is one.
        min_run_time: Seconds of timing per measured layer width for a ``latency=`` target.
        corrections: Times a ``latency=`` plan is made again after measuring the pruned network, when its measured
            speed misses the target by more than 5% (the target is scaled by the measured miss).
    """

    engine: Engine = field(default=Engine.EAGER, metadata={"flag": "--engine"})
    batch: int = field(default=64, metadata={"flag": "--batch"})
    threads: int | None = field(default=None, metadata={"flag": "--latency-threads"})
    grid: int = field(default=8, metadata={"flag": "--latency-grid"})
    min_run_time: float = field(default=0.05, metadata={"flag": "--latency-run-time"})
    corrections: int = field(default=2, metadata={"flag": "--latency-corrections"})

    def __post_init__(self) -> None:
        coerce_fields(self)
        t = self.min_run_time
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= 600:  # also refuses NaN
            raise ValueError(f"min_run_time (--latency-run-time) must be seconds in (0, 600], got {t!r}")
        check_latency_settings(self.min_run_time, self.threads, (self.batch,))
        if isinstance(self.grid, bool) or not isinstance(self.grid, int) or not 2 <= self.grid <= 16:
            raise ValueError(f"grid (--latency-grid) must be an int in [2, 16], got {self.grid!r}")
        if isinstance(self.corrections, bool) or not isinstance(self.corrections, int) or \
                not 0 <= self.corrections <= 10:
            raise ValueError(f"corrections (--latency-corrections) must be an int in [0, 10], got {self.corrections!r}")
        check_engine(self.engine)

    def describe(self) -> str:
        threads = self.threads or torch.get_num_threads()
        return f"{self.engine.value}, batch {self.batch}, {threads} thread(s)"


@dataclass
class LayerTiming:
    """One layer's measured latency (ms) on a grid of kept input and output widths."""

    in_widths: list[int]
    out_widths: list[int]
    ms: list[list[float]]  # [input width index][output width index]

    def predict(self, kept_in: float, kept_out: float) -> float:
        """Bilinear interpolation; outside the grid, the nearest measured width (no extrapolation: below the
        narrowest measured width a layer is predicted no faster than at it)."""
        z = np.asarray(self.ms)

        def locate(grid: list[int], v: float) -> tuple[int, int, float]:
            if len(grid) == 1:
                return 0, 0, 0.0
            v = min(max(v, grid[0]), grid[-1])
            i = int(np.clip(np.searchsorted(grid, v) - 1, 0, len(grid) - 2))
            return i, i + 1, (v - grid[i]) / (grid[i + 1] - grid[i])

        i, i1, a = locate(self.in_widths, kept_in)
        j, j1, b = locate(self.out_widths, kept_out)
        value = (1 - a) * (1 - b) * z[i, j] + a * (1 - b) * z[i1, j] + (1 - a) * b * z[i, j1] + a * b * z[i1, j1]
        return float(max(value, 0.0))


@dataclass
class LayerState:
    """A layer as a plan leaves it: kept (input, output) widths, or a bottleneck's kept ranks."""

    kept_in: float
    kept_out: float
    bottleneck: bool = False


@dataclass
class LatencyTable:
    """Per-layer timings and the whole-network fit; :meth:`predict` gives a network's latency from its layers."""

    settings: dict[str, Any]
    layers: dict[str, LayerTiming]
    dense_widths: dict[str, tuple[int, int]]
    activations: dict[str, int]  # output elements per output channel and example, per layer
    fits: dict[int, tuple[float, float, float]]  # rounding -> (a, b, c)
    calibration: dict[int, list[dict[str, float]]] = field(default_factory=dict)  # keep, measured_ms, predicted_ms
    projections: dict[str, tuple[LayerTiming, LayerTiming]] = field(default_factory=dict)
    round_to: int = 1
    rounding: list[dict[str, float]] = field(default_factory=list)  # round_to, flops_kept, measured_ms, layers_ms

    def layer_ms(self, name: str, state: LayerState) -> float:
        """The (unscaled) time of one layer in ``state``."""
        timing = self.layers[name]
        if not state.bottleneck:
            return timing.predict(state.kept_in, state.kept_out)
        if name not in self.projections:
            raise ValueError(f"layer {name!r} is a bottleneck, but this table was measured without bottleneck "
                             "projections (latency_table(..., bottlenecks=True))")
        project_in, project_out = self.projections[name]
        c_in, c_out = self.dense_widths[name]
        return project_in.predict(c_in, state.kept_in) + timing.predict(state.kept_in, state.kept_out) + \
            project_out.predict(state.kept_out, c_out)

    def terms(self, states: dict[str, LayerState] | None = None) -> tuple[float, float]:
        """``(sum of layer ms, kept activation fraction)`` with the given layer states (others dense)."""
        states = states or {}
        layers = kept = dense = 0.0
        for name in self.layers:
            c_in, c_out = self.dense_widths[name]
            state = states.get(name, LayerState(c_in, c_out))
            layers += self.layer_ms(name, state)
            out = c_out if state.bottleneck else state.kept_out
            kept += out * self.activations[name]
            dense += c_out * self.activations[name]
        return layers, kept / dense if dense else 1.0

    @property
    def coefficients(self) -> tuple[float, float, float]:
        """The fit of arbitrary widths (rounding 1)."""
        return self.fits[1]

    def rounding_of(self, states: dict[str, LayerState] | None) -> int:
        """The coarsest of the fitted roundings every thinned layer's kept output width is a multiple of (1 when
        nothing is thinned): for a network whose rounding is not known."""
        thinned = [st.kept_out for n, st in (states or {}).items()
                   if not st.bottleneck and n in self.dense_widths and st.kept_out < self.dense_widths[n][1]]
        if not thinned:
            return 1
        return max(r for r in self.fits if all(int(w) % r == 0 for w in thinned))

    def predict(self, states: dict[str, LayerState] | None = None, round_to: int | None = None) -> float:
        """Predicted latency (ms) of the network with the given layer states (the others dense), by the fit for
        widths rounded to ``round_to`` (default: :meth:`rounding_of` the states)."""
        a, b, c = self.fits[self.rounding_of(states) if round_to is None else round_to]
        layers, act = self.terms(states)
        return a * layers + b * act + c

    def predict_model(self, model: nn.Module, round_to: int | None = None) -> float:
        """Predicted latency (ms) of ``model`` (the table's network, possibly pruned) as it is now."""
        return self.predict(model_states(model, self.layers), round_to)

    def speedup(self, model: nn.Module) -> float:
        """Predicted dense over ``model`` latency, both by the fit of the rounding ``model``'s widths are on."""
        r = self.rounding_of(model_states(model, self.layers))
        return self.predict(None, r) / self.predict_model(model, r)

    def to_dict(self) -> dict[str, Any]:
        return {"format": TABLE_FORMAT, "settings": self.settings,
                "dense_widths": {k: list(v) for k, v in self.dense_widths.items()},
                "activations": self.activations, "fits": {str(r): list(f) for r, f in self.fits.items()},
                "calibration": {str(r): points for r, points in self.calibration.items()},
                "layers": {n: vars(t) for n, t in self.layers.items()},
                "projections": {n: [vars(t) for t in pair] for n, pair in self.projections.items()},
                "round_to": self.round_to, "rounding": self.rounding}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatencyTable:
        if data.get("format") != TABLE_FORMAT:
            raise ValueError(f"not a latency table: format {data.get('format')!r}, expected {TABLE_FORMAT}")
        return cls(data["settings"], {n: LayerTiming(**t) for n, t in data["layers"].items()},
                   {k: (int(v[0]), int(v[1])) for k, v in data["dense_widths"].items()},
                   {k: int(v) for k, v in data["activations"].items()},
                   {int(r): tuple(float(v) for v in f) for r, f in data["fits"].items()},
                   {int(r): list(points) for r, points in data["calibration"].items()},
                   {n: (LayerTiming(**p[0]), LayerTiming(**p[1])) for n, p in data["projections"].items()},
                   int(data["round_to"]), list(data["rounding"]))


def model_states(model: nn.Module, names: Iterable[str]) -> dict[str, LayerState]:
    """The state of each named layer of ``model`` now: a conv/linear layer's widths or a bottleneck's ranks."""
    states = {}
    for name in names:
        try:
            m = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the latency table names layer {name!r}, which this model does not have: the table "
                             "belongs to another network") from None
        if isinstance(m, nn.Conv2d):
            states[name] = LayerState(m.in_channels, m.out_channels)
        elif isinstance(m, nn.Linear):
            states[name] = LayerState(m.in_features, m.out_features)
        elif isinstance(getattr(m, "rank_in", None), int):
            states[name] = LayerState(m.rank_in, m.rank_out, bottleneck=True)
    return states


# ------------------------------------------------------------------------------------------------ measuring


@dataclass
class _LayerShape:
    kind: str  # "conv" or "linear"
    in_channels: int
    out_channels: int
    input_shape: list[int]  # one example, without batch: (C, H, W) or (..., features)
    output_shape: list[int]
    kernel: list[int] = field(default_factory=list)
    stride: list[int] = field(default_factory=list)
    padding: list[int] = field(default_factory=list)
    dilation: list[int] = field(default_factory=list)
    bias: bool = True

    @property
    def per_channel(self) -> int:
        """Output elements per output channel."""
        return int(np.prod(self.output_shape)) // self.out_channels


def layer_shapes(model: nn.Module, example: torch.Tensor) -> dict[str, _LayerShape]:
    """Every ungrouped Conv2d (numeric padding) and Linear layer of ``model`` with the input size it sees."""
    shapes: dict[str, _LayerShape] = {}

    def hook(name: str):
        def record(mod, args, out):
            x = args[0]
            if isinstance(mod, nn.Conv2d):
                shapes[name] = _LayerShape("conv", mod.in_channels, mod.out_channels, list(x.shape[1:]),
                                           list(out.shape[1:]), list(mod.kernel_size), list(mod.stride),
                                           list(mod.padding), list(mod.dilation), mod.bias is not None)
            else:
                shapes[name] = _LayerShape("linear", mod.in_features, mod.out_features, list(x.shape[1:]),
                                           list(out.shape[1:]), bias=mod.bias is not None)
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1
                                               and isinstance(m.padding, tuple))]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(example[:1])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return shapes


def _replica(shape: _LayerShape, cin: int, cout: int, kernel: bool = True) -> tuple[nn.Module, tuple[int, ...]]:
    """The layer at other widths (``kernel=False``: a 1x1 convolution on the same input size) and its input."""
    if shape.kind == "linear":
        return nn.Linear(cin, cout, bias=shape.bias).eval(), (*shape.input_shape[:-1], cin)
    if not kernel:
        return nn.Conv2d(cin, cout, 1, bias=shape.bias).eval(), (cin, *shape.input_shape[1:])
    layer = nn.Conv2d(cin, cout, tuple(shape.kernel), tuple(shape.stride), tuple(shape.padding),
                      tuple(shape.dilation), bias=shape.bias)
    return layer.eval(), (cin, *shape.input_shape[1:])


def _eager_runner(layer: nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    def run():
        with torch.no_grad():
            return layer(x)
    return run


def _onnx_runner(layer: nn.Module | None, x: torch.Tensor, threads: int) -> Callable[[], Any]:
    """The layer as a one-node ONNX graph (Conv, or MatMul + Add) in an ONNX Runtime session; ``None``: an Identity
    node (the cost of an empty call)."""
    from onnx import TensorProto, helper, numpy_helper

    inits, nodes = [], []
    if layer is None:
        nodes.append(helper.make_node("Identity", ["x"], ["y"]))
    elif isinstance(layer, nn.Conv2d):
        inits.append(numpy_helper.from_array(layer.weight.detach().numpy(), "w"))
        inputs = ["x", "w"]
        if layer.bias is not None:
            inits.append(numpy_helper.from_array(layer.bias.detach().numpy(), "b"))
            inputs.append("b")
        nodes.append(helper.make_node("Conv", inputs, ["y"], kernel_shape=list(layer.kernel_size),
                                      strides=list(layer.stride), pads=[*layer.padding, *layer.padding],
                                      dilations=list(layer.dilation)))
    else:
        inits.append(numpy_helper.from_array(layer.weight.detach().numpy().T.copy(), "w"))
        nodes.append(helper.make_node("MatMul", ["x", "w"], ["y" if layer.bias is None else "m"]))
        if layer.bias is not None:
            inits.append(numpy_helper.from_array(layer.bias.detach().numpy(), "b"))
            nodes.append(helper.make_node("Add", ["m", "b"], ["y"]))
    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feed = {"x": x.numpy()}
    return lambda: session.run(None, feed)


def _grid(n: int, points: int) -> list[int]:
    """``points`` even fractions of ``n`` and half the smallest (a layer may keep a tenth of its width), each on
    the nearest multiple of 8 when ``n`` is one (kernels change speed at such widths, so measure them there)."""
    widths = {max(1, round(n * k / points)) for k in range(1, points + 1)} | {max(1, round(n / (2 * points)))}
    if n % 8 == 0:
        widths = {max(8, 8 * round(w / 8)) if w >= 6 else w for w in widths}
    return sorted(widths)


def _time_grid(shape: _LayerShape, ins: list[int], outs: list[int], settings: LatencySettings, threads: int,
               kernel: bool, tick: Callable[[], None]) -> LayerTiming:
    ms = np.zeros((len(ins), len(outs)))
    for i, cin in enumerate(ins):
        empty = 0.0
        if settings.engine is Engine.ONNXRUNTIME:  # the per-call cost, paid once per graph, not per layer
            x = torch.randn(settings.batch, *_replica(shape, cin, 1, kernel)[1])
            empty = time_ms(_onnx_runner(None, x, threads), threads, settings.min_run_time)[0]
        for j, cout in enumerate(outs):
            layer, one = _replica(shape, cin, cout, kernel)
            x = torch.randn(settings.batch, *one)
            run = _eager_runner(layer, x) if settings.engine is Engine.EAGER else _onnx_runner(layer, x, threads)
            ms[i, j] = max(time_ms(run, threads, settings.min_run_time)[0] - empty, 0.0)
            tick()
    ms = np.maximum.accumulate(np.maximum.accumulate(ms, axis=0), axis=1)  # wider never predicts faster
    return LayerTiming(ins, outs, ms.tolist())


def uniform_plan(graph, keep: float, round_to: int = 1):
    """The :class:`~prunekit.channels.graph.ChannelPlan` keeping ``keep`` of every group of ``graph`` (at least one
    unit each; rounded up to a multiple of ``round_to`` as the allocation rounds): the last channels go, which runs
    as fast as any other choice."""
    from prunekit.channels.graph import ChannelPlan

    removed = {}
    for g in graph.groups:
        units = g.units
        kept = max(1, len(units) - int(round((1 - keep) * len(units))))
        if round_to > 1 and len(units) == g.size:
            kept = min(len(units), -(-kept // round_to) * round_to)
        drop = len(units) - kept
        if drop > 0:
            removed[g.root] = tuple(c for u in units[len(units) - drop:] for c in u)
    return ChannelPlan(removed)


def uniform_thin(model: nn.Module, example: torch.Tensor, keep: float, ignore: Iterable[str] = (),
                 round_to: int = 1) -> nn.Module:
    """A copy of ``model`` shrunk by :func:`uniform_plan`."""
    from prunekit.channels.graph import ChannelGraph

    thin = copy.deepcopy(model).eval()
    if keep < 1:
        graph = ChannelGraph(thin, example, ignore=tuple(ignore))
        graph.shrink_(uniform_plan(graph, keep, round_to))
    return thin


def engine_runners(models: dict[str, nn.Module], input_shape: tuple[int, ...], settings: LatencySettings,
                   threads: int, workdir: Path, form_time: float | None = None) -> dict[str, Callable[[], Any]]:
    """One runner per model in the settings' engine and batch, each in its inference form (BatchNorm folded; the
    eager memory format chosen by ``form_time`` seconds of timing each)."""
    from prunekit.measurement.deploy import export_runners

    onnx = settings.engine is Engine.ONNXRUNTIME
    runners, _ = export_runners(models, input_shape, (settings.batch,), threads, onnx, workdir,
                                min_run_time=form_time or 2 * settings.min_run_time)
    return {name: runners[(name, settings.engine.value, settings.batch)] for name in models}


def measure_speedup(dense: nn.Module, pruned: nn.Module, input_shape: tuple[int, ...], settings: LatencySettings,
                    repeats: int = 5, min_run_time: float | None = None) -> dict[str, float]:
    """Dense and pruned latency (ms) in the settings' engine, measured in alternation ``repeats`` times for
    ``min_run_time`` seconds each (default: four times the settings' time per table point, at least 0.1), and
    their ratio. Neither network is changed (each runs as an inference-form copy).

    Returns:
        ``{"dense_ms", "pruned_ms", "speedup"}``.
    """
    threads = settings.threads or torch.get_num_threads()
    min_run_time = max(0.1, 4 * settings.min_run_time) if min_run_time is None else min_run_time
    modes = (dense.training, pruned.training)
    try:
        with tempfile.TemporaryDirectory(prefix="prunekit-latency-") as tmp:
            runners = engine_runners({"dense": dense, "pruned": pruned}, input_shape, settings, threads, Path(tmp),
                                     form_time=max(min_run_time, 2 * settings.min_run_time))
            times = paired_latency(runners, threads, repeats, min_run_time)
    finally:
        dense.train(modes[0])
        pruned.train(modes[1])
    return {"dense_ms": times["dense"], "pruned_ms": times["pruned"], "speedup": times["dense"] / times["pruned"]}


def cache_key(shapes: dict[str, _LayerShape], settings: LatencySettings, threads: int, bottlenecks: bool,
              ignore: Iterable[str], structure: list[str] | None = None) -> str:
    """What a table depends on: layer shapes, the network's module types in order (``structure``), settings,
    versions, the machine and the fitting constants."""
    import platform

    versions = {"torch": torch.__version__, "machine": [platform.machine(), platform.processor(), os.cpu_count()]}
    if settings.engine is Engine.ONNXRUNTIME:
        import onnxruntime

        versions["onnxruntime"] = onnxruntime.__version__
    measured = {k: v for k, v in settings.to_dict().items() if k != "corrections"}  # what the table depends on
    what = {"layers": {n: vars(s) for n, s in shapes.items()}, "settings": {**measured, "threads": threads},
            "versions": versions, "bottlenecks": bottlenecks, "ignore": sorted(ignore),
            "calibration": CALIBRATION, "roundings": ROUNDINGS, "probe": PROBE_FLOPS, "dense_weight": DENSE_WEIGHT,
            "modules": structure, "format": TABLE_FORMAT}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:24]


def latency_table(model: nn.Module, example: torch.Tensor, settings: LatencySettings = LatencySettings(), *,
                  bottlenecks: bool = False, ignore: Iterable[str] = (), cache: Path | None | bool = True,
                  progress: bool = False, log: Callable[[str], None] = lambda _: None) -> LatencyTable:
    """The latency table of ``model`` (at its current, dense widths) for ``settings``: cached, or measured.

    Args:
        example: Example inputs (a batch of images; only one example's shape is used).
        bottlenecks: Also measure each layer's 1x1 projections for EigenDamage bottlenecks.
        ignore: Modules the calibration's uniform thinning leaves whole (the method's ``ignore``).
        cache: ``True``: :func:`cache_dir`; a folder; ``None``/``False``: always measure, write nothing.

    Raises:
        ValueError: inputs that are not one image tensor, or a model without Conv2d/Linear layers.
    """
    from tqdm.auto import tqdm

    from prunekit.persistence.checkpoint import atomic_write

    if not isinstance(example, torch.Tensor):
        raise ValueError("latency= targets cover models that take one tensor (image classifiers); this model takes "
                         f"{type(example).__name__} inputs: use a flops= or params= target")
    ignore = tuple(ignore)
    threads = settings.threads or torch.get_num_threads()
    shapes = layer_shapes(model, example)
    if not shapes:
        raise ValueError("a latency table needs Conv2d or Linear layers; this model has none")
    folder = cache_dir() if cache is True else (Path(cache) if cache else None)
    structure = [f"{n}:{type(m).__name__}" for n, m in model.named_modules()]
    key = cache_key(shapes, settings, threads, bottlenecks, ignore, structure)
    path = folder / f"{key}.json" if folder else None
    if path is not None and path.is_file():
        try:
            table = LatencyTable.from_dict(json.loads(path.read_text()))
            log(f"latency table: cached ({path})")
            return table
        except (ValueError, KeyError, TypeError, IndexError, json.JSONDecodeError):
            log(f"latency table: the cached {path} is unreadable; measuring it again")
    log(f"latency table: measuring {len(shapes)} layers ({settings.describe()}); cached for later runs")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        grids = {n: (_grid(s.in_channels, settings.grid), _grid(s.out_channels, settings.grid))
                 for n, s in shapes.items()}
        total = sum(len(i) * len(o) + (len(i) + len(o) if bottlenecks else 0) for i, o in grids.values()) \
            + len(ROUNDINGS) * (1 + len(CALIBRATION))
        with tqdm(total=total, desc="latency table", disable=not progress, leave=False) as bar:
            def tick() -> None:
                bar.update(1)

            layers, projections, seen = {}, {}, {}
            for name, s in shapes.items():  # layers of one shape (a ResNet stage's convolutions) are timed once
                ins, outs = grids[name]
                same = seen.setdefault(json.dumps(vars(s), sort_keys=True), name)
                if same != name:
                    layers[name] = layers[same]
                    projections.update({name: projections[same]} if bottlenecks else {})
                    for _ in range(len(ins) * len(outs) + (len(ins) + len(outs) if bottlenecks else 0)):
                        tick()
                    continue
                layers[name] = _time_grid(s, ins, outs, settings, threads, True, tick)
                if bottlenecks:
                    projections[name] = (_time_grid(s, [s.in_channels], ins, settings, threads, False, tick),
                                         _time_grid(_at_output(s), outs, [s.out_channels], settings, threads, False,
                                                    tick))
            widths = {n: (s.in_channels, s.out_channels) for n, s in shapes.items()}
            partial = LatencyTable({}, layers, widths, {n: s.per_channel for n, s in shapes.items()}, {},
                                   projections=projections)
            partial.round_to, partial.rounding = _choose_rounding(model, example, partial, settings, threads, ignore,
                                                                  tick)
            known: dict[tuple, float] = {}  # networks measured once (the dense one, and roundings that coincide)
            for r in ROUNDINGS:
                partial.fits[r], partial.calibration[r] = _calibrate(model, example, partial, settings, threads,
                                                                     ignore, r, tick, known)
    finally:
        torch.set_num_threads(previous)
    partial.settings = {**settings.to_dict(), "threads": threads, "torch": torch.__version__}
    if path is not None:
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(partial.to_dict(), default=str)))
    return partial


def _at_output(shape: _LayerShape) -> _LayerShape:
    """A bottleneck's output projection runs on the layer's output size."""
    c = shape.out_channels
    size = [c, *shape.output_shape[1:]] if shape.kind == "conv" else [*shape.output_shape[:-1], c]
    return _LayerShape(shape.kind, c, c, size, shape.output_shape, bias=shape.bias)


def _measure_networks(models: dict[str, nn.Module], example: torch.Tensor, settings: LatencySettings, threads: int,
                      tick: Callable[[], None]) -> dict[str, float]:
    """Median latency (ms) of each network in the engine, measured in alternation three times."""
    with tempfile.TemporaryDirectory(prefix="prunekit-latency-") as tmp:
        runners = engine_runners(models, tuple(example.shape[1:]), settings, threads, Path(tmp))
        samples: dict[str, list[float]] = {k: [] for k in models}
        for _ in range(3):
            for k, ms in paired_latency(runners, threads, 1, 2 * settings.min_run_time).items():
                samples[k].append(ms)
    for _ in models:
        tick()
    return {k: statistics.median(v) for k, v in samples.items()}


def _choose_rounding(model: nn.Module, example: torch.Tensor, table: LatencyTable, settings: LatencySettings,
                     threads: int, ignore: tuple[str, ...], tick: Callable[[], None]
                     ) -> tuple[int, list[dict[str, float]]]:
    """The smallest of ``ROUNDINGS`` whose uniformly thinned network at ``PROBE_FLOPS`` of the dense FLOPs (the
    kept fraction searched per rounding) measures within 3% of the fastest."""
    from prunekit.channels.graph import ChannelGraph
    from prunekit.planning.allocation import CostModel, TargetMetric

    base = copy.deepcopy(model).eval()
    graph = ChannelGraph(base, example, ignore=tuple(ignore))
    cost = CostModel(base, graph, inputs=example[:1])
    keeps = np.linspace(0.2, 1.0, 81)
    models, flops = {}, {}
    for r in ROUNDINGS:
        kept = [cost.cost(uniform_plan(graph, k, r), TargetMetric.FLOPS) for k in keeps]
        best = int(np.argmin([abs(f - PROBE_FLOPS) for f in kept]))
        models[str(r)], flops[str(r)] = uniform_thin(model, example, float(keeps[best]), ignore, r), kept[best]
    measured = _measure_networks(models, example, settings, threads, tick)
    rows = [{"round_to": r, "flops_kept": flops[str(r)], "measured_ms": measured[str(r)],
             "layers_ms": table.terms(model_states(models[str(r)], table.layers))[0]} for r in ROUNDINGS]
    fastest = min(row["measured_ms"] for row in rows)
    return next(row["round_to"] for row in rows if row["measured_ms"] <= 1.03 * fastest), rows


def _calibrate(model: nn.Module, example: torch.Tensor, table: LatencyTable, settings: LatencySettings, threads: int,
               ignore: tuple[str, ...], round_to: int, tick: Callable[[], None], known: dict[tuple, float]
               ) -> tuple[tuple[float, float, float], list[dict[str, float]]]:
    """Fit ``a, b, c >= 0`` to the whole network measured at the calibration widths rounded to ``round_to``
    (networks already in ``known``, by their layer widths, are not measured again)."""
    from scipy.optimize import nnls

    models = {f"{keep:g}": uniform_thin(model, example, keep, ignore, round_to) for keep in CALIBRATION}
    shapes = {k: tuple((n, st.kept_in, st.kept_out) for n, st in model_states(m, table.layers).items())
              for k, m in models.items()}
    unseen = {}
    for k, m in models.items():
        if shapes[k] not in known and shapes[k] not in {shapes[u] for u in unseen}:
            unseen[k] = m
    if unseen:
        for k, ms in _measure_networks(unseen, example, settings, threads, lambda: None).items():
            known[shapes[k]] = ms
    for _ in models:
        tick()
    measured = {k: known[shapes[k]] for k in models}
    rows = np.array([[*table.terms(model_states(models[k], table.layers)), 1.0] for k in models])
    target = np.array([measured[k] for k in models])
    # relative errors (a speedup is a ratio), the dense network weighted most: every speedup is relative to it
    weight = np.array([DENSE_WEIGHT if keep >= 1 else 1.0 for keep in CALIBRATION]) / target
    coef, _ = nnls(rows * weight[:, None], target * weight)
    points = [{"keep": float(k), "measured_ms": measured[k], "predicted_ms": float(rows[i] @ coef)}
              for i, k in enumerate(models)]
    return (float(coef[0]), float(coef[1]), float(coef[2])), points
