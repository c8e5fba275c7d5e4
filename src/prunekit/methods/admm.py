"""ADMM-NN-S: joint weight pruning and quantization by ADMM (Ma et al. 2019, arXiv 1907.02124; Zhang et al. 2018,
arXiv 1804.03294).

Minimise ``loss(W)`` subject to ``W_l in S_l`` for every constrained layer through the augmented Lagrangian:

* W-step: training of ``loss(W) + sum_l rho / 2 ||W_l - Z_l + U_l||^2`` (the penalty by its exact proximal step);
* Z-step: ``Z_l = Pi_{S_l}(W_l + U_l)`` (:mod:`prunekit.planning.constraints`);
* U-step: ``U_l += W_l - Z_l``;

with Z and U updated every ``update_every`` steps and ``rho`` rising geometrically to ``rho_max`` over the phase's
updates, so that by the end W sits on the constraint set (the energy the hard projection then removes,
``||W - Pi(W)||^2 / ||W||^2``, is recorded; above 1% the phase is reported as unconverged). Then ``W = Pi_S(W)`` and
masked retraining (removed weights and their momentum zeroed after every step, so zeros stay zero). High rates are
reached progressively (:class:`~prunekit.planning.schedule.StageSchedule`, as ADMM-NN-S's 10x -> 30x -> 60x ->
100x): every stage is ADMM, projection and retraining from the last stage's weights, its zeros kept, stopped at the
last stage within a validation tolerance. With quantization: after pruning and retraining, a second ADMM phase
drives the kept weights to their levels, then progressive partial quantization fixes a growing fraction of them on the
levels (smallest quantization error first) while the rest retrain, until all are quantized; a last epoch
retrains only what stays float (biases, normalisation).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from torch.utils.data import Subset

from prunekit.channels.graph import ChannelGraph, ChannelPlan, SliceKind, find_output_layers, ignored_modules
from prunekit.configs import Config, coerce_fields
from prunekit.data import DataSplits
from prunekit.methods.registry import MethodSpec, PruneRecord, RunContext, register
from prunekit.planning.allocation import (
    Allocation,
    CostModel,
    InfeasibleTargetError,
    Target,
    TargetMetric,
    plan_for_target,
    refuse_latency_target,
    sensitivity_rates,
    weight_costs,
)
from prunekit.planning.allocation import allocate_rates as allocate
from prunekit.planning.constraints import QuantConstraint, QuantKind, SparsityConstraint, sparsity_mask
from prunekit.planning.pattern import Pattern, check_pattern
from prunekit.planning.schedule import Phases, StageSchedule
from prunekit.training import Schedule, TrainConfig, TrainHooks, evaluate, fit

ADMM_ALLOCATIONS = (Allocation.GLOBAL, Allocation.UNIFORM, Allocation.SENSITIVITY)
ADMM_PATTERNS = (Pattern.UNSTRUCTURED, Pattern.FILTER, Pattern.CHANNEL, Pattern.COLUMN, Pattern.K_OF_N,
                 Pattern.GROUP)


@dataclass(frozen=True)
class ADMMConfig(Config):
    """ADMM pruning (and quantization) settings.

    Args:
        pattern: What is kept or removed together: ``unstructured``, ``filter``, ``channel``, ``column``,
            ``k-of-n``, or ``group`` (whole coupled channels, removed physically after ADMM).
        target: ``params=F`` keeps ``F`` of the constrained weights (``params=0.02`` or ``params=x50``; default
            ``params=0.1``), ``flops=F`` a fraction of their FLOPs (the allocation weighs each weight by its
            layer's FLOPs); the group pattern keeps ``flops=``, ``params=`` or ``channels=`` of the whole model.
            Not used by k-of-n, which keeps ``k / n``.
        k: k-of-n pattern: weights kept in every run of ``n``.
        n: k-of-n pattern: run length.
        rates: Per-layer keep fractions that override the allocation (layer name -> fraction).
        quant: Joint quantization of the kept weights: ``none``, ``binary``, ``ternary`` or ``bits=N``.
        allocation: How ``target`` is spread over the layers ``rates`` does not name: ``global`` (one magnitude
            threshold over all layers' units), ``uniform``, or ``sensitivity`` (each layer's validation loss when it
            alone is pruned decides, :func:`prunekit.planning.allocation.sensitivity_rates`; no layer starves).
        rho: Penalty at the first Z/U update.
        rho_max: Penalty at the last Z/U update of an ADMM phase; ``rho`` rises geometrically to it, so that W is
            pulled onto the constraint set by the end (a phase that still leaves over 1% of the weights' energy to
            the hard projection is reported as unconverged).
        admm_epochs: Epochs of ADMM training per stage (and for the quantization phase).
        retrain_epochs: Epochs of masked retraining after each hard projection.
        update_every: Update Z and U every this many steps, and at least once an epoch (0: once an epoch).
        stages: Progressive pruning (:class:`~prunekit.planning.schedule.StageSchedule`): the rates of the stages
            before the target's (``--stages 10 30 60`` with ``params=x100``) and the validation tolerance that stops
            them.
        quant_steps: Fractions quantized at each progressive step (each followed by one retraining epoch).
        ignore: Modules left unconstrained, containers included (besides BatchNorm and biases, which never are).
        include_output: Constrain the output layer too (ADMM-NN prunes LeNet's classifier).
    """

    pattern: Pattern = field(default=Pattern.UNSTRUCTURED, metadata={"choices": ADMM_PATTERNS})
    target: Target | None = None
    k: int | None = None
    n: int | None = None
    rates: dict[str, float] = field(default_factory=dict)
    allocation: Allocation = field(default=Allocation.GLOBAL, metadata={"choices": ADMM_ALLOCATIONS})
    quant: QuantConstraint = QuantConstraint()
    rho: float = 1e-2
    rho_max: float = 100.0
    admm_epochs: int = 4
    retrain_epochs: int = 4
    update_every: int = 50
    stages: StageSchedule = StageSchedule()
    quant_steps: tuple[float, ...] = (0.5, 0.75, 0.9, 1.0)
    ignore: tuple[str, ...] = ()
    include_output: bool = True

    def __post_init__(self) -> None:
        coerce_fields(self)
        object.__setattr__(self, "pattern", check_pattern(self.pattern, ADMM_PATTERNS, "ADMM"))
        if self.pattern is Pattern.K_OF_N:
            SparsityConstraint(self.pattern, 0.5, self.k, self.n)  # k and n given, k < n
            if self.target is not None:
                raise ValueError("the k-of-n pattern keeps k of every n weights: give k and n, not a target")
        elif self.k is not None or self.n is not None:
            raise ValueError(f"k and n belong to the k-of-n pattern; the {self.pattern.value} pattern keeps a "
                             "fraction set by the target")
        if self.pattern in (Pattern.K_OF_N, Pattern.GROUP) and (self.rates or self.allocation is not
                                                                   Allocation.GLOBAL):
            raise ValueError(f"rates and allocation spread a target over layers; the {self.pattern.value} pattern "
                             "does not use them" + (" (k of n everywhere)" if self.pattern is Pattern.K_OF_N
                                                    else " (its channel groups are ranked globally)"))
        if self.pattern is not Pattern.K_OF_N:
            if self.target is None:
                object.__setattr__(self, "target", Target(TargetMetric.PARAMS, 0.1))  # the default: 10x
            if not isinstance(self.target, Target):
                raise ValueError(f"ADMM needs a target such as params=0.02 or params=x50, got {self.target!r}")
            refuse_latency_target(self.target, "admm")
            if self.pattern is not Pattern.GROUP:
                if self.target.metric is TargetMetric.CHANNELS:
                    raise ValueError(f"the {self.pattern.value} pattern keeps weights: give params=0.02, params=x50 "
                                     f"or flops=x4 (channels=... needs the group pattern), got {self.target}")
                SparsityConstraint(self.pattern, self.keep, self.k, self.n)
        for name, value in self.rates.items():
            if not (isinstance(value, (int, float)) and 0 < value <= 1):
                raise ValueError(f"rate for {name} must be a keep fraction in (0, 1], got {value!r}")
        if not (math.isfinite(self.rho) and 0 < self.rho <= 1e4) or \
                not (math.isfinite(self.rho_max) and self.rho <= self.rho_max <= 1e4):
            raise ValueError(f"rho must be > 0 and at most 1e4, and rho_max between rho and 1e4; got rho "
                             f"{self.rho!r}, rho_max {self.rho_max!r}")
        if not self.admm_epochs:
            ignored = [f"{name}={getattr(self, name)!r}" for name in ("rho", "rho_max", "update_every")
                       if getattr(self, name) != getattr(ADMMConfig, name)]
            if ignored:
                raise ValueError(f"{', '.join(ignored)} set the ADMM phases, and admm_epochs is 0 (magnitude pruning "
                                 "and masked retraining only); give admm_epochs or leave them out")
        if self.stages.rates or self.stages.tolerance is not None:
            if self.pattern in (Pattern.K_OF_N, Pattern.GROUP):
                raise ValueError(f"stages prune progressively to a weight target; the {self.pattern.value} pattern "
                                 "runs in one stage")
            self.stages.keeps(self.target)  # every stage below the target's rate
        for name in ("admm_epochs", "retrain_epochs", "update_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        steps = tuple(float(s) for s in self.quant_steps)
        if not steps or any(not 0 < s <= 1 for s in steps) or any(a >= b for a, b in zip(steps, steps[1:])) \
                or steps[-1] != 1.0:
            raise ValueError(f"quant_steps must rise in (0, 1] and end at 1.0, got {self.quant_steps!r}")
        if self.quant.kind is QuantKind.NONE and steps != ADMMConfig.quant_steps:
            raise ValueError("quant_steps schedule the progressive quantization; give them with quant")
        object.__setattr__(self, "quant_steps", steps)
        object.__setattr__(self, "ignore", tuple(self.ignore))
        object.__setattr__(self, "rates", dict(self.rates))

    @property
    def keep(self) -> float:
        """Fraction kept: the target's, or ``k / n``."""
        return self.k / self.n if self.pattern is Pattern.K_OF_N else self.target.keep

    def constraint(self, keep: float) -> SparsityConstraint:
        return SparsityConstraint(self.pattern, keep if self.pattern is not Pattern.K_OF_N else 0.5, self.k, self.n)

    def label(self) -> str:
        """How the report names the run: ``admm unstructured params=0.1 bits=3``."""
        what = str(self.target) if self.target is not None else f"{self.k}-of-{self.n}"
        return f"admm {self.pattern.value} {what}" + (f" {self.quant}" if self.quant.kind is not QuantKind.NONE
                                                       else "")


def constrained_layers(model: nn.Module, config: ADMMConfig, example: torch.Tensor) -> dict[str, nn.Module]:
    """Conv/Linear layers whose weights ADMM constrains (names in ``ignore`` and, unless included, the output
    layer are left out)."""
    modules = dict(model.named_modules())
    skip = ignored_modules(model, list(config.ignore)) | \
        (set() if config.include_output else set(find_output_layers(model, example)))
    return {n: m for n, m in modules.items()
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) and n not in skip and getattr(m, "groups", 1) == 1}


def unit_entries(weight: torch.Tensor, pattern: Pattern) -> int:
    """Weights in one unit of ``pattern`` (what ADMM keeps or removes together) of a weight tensor."""
    mat = weight.reshape(weight.shape[0], -1)
    return {Pattern.UNSTRUCTURED: 1, Pattern.FILTER: mat.shape[1], Pattern.COLUMN: mat.shape[0],
            Pattern.CHANNEL: weight[:, :1].numel()}.get(pattern, 1)


def check_feasible(layers: dict[str, nn.Module], config: ADMMConfig, costs: dict[str, float] | None = None) -> None:
    """Refuse a keep fraction below one unit per constrained layer: a layer with nothing left cuts the network.
    ``costs``: each layer's cost per weight (FLOPs targets), default 1 (parameters).

    Raises:
        InfeasibleTargetError: naming the smallest fraction that can be kept.
    """
    if config.pattern in (Pattern.K_OF_N, Pattern.GROUP) or len(config.rates) == len(layers):
        return
    cost = {n: costs[n] if costs else 1.0 for n in layers}
    total = sum(m.weight.numel() * cost[n] for n, m in layers.items())
    smallest = sum(unit_entries(m.weight, config.pattern) * cost[n] for n, m in layers.items()) / total
    if config.keep < smallest:
        metric = config.target.metric.value
        what = "weights" if metric == "params" else "weights' FLOPs"
        raise InfeasibleTargetError(
            f"target {metric}={config.keep:g} is infeasible for the {config.pattern.value} pattern: every one of the "
            f"{len(layers)} constrained layers keeps at least one unit, which is {smallest:.3g} of their {what}; "
            f"give {metric}={smallest:.3g} or more (or ignore some layers)")


def allocate_rates(layers: dict[str, nn.Module], config: ADMMConfig, costs: dict[str, float] | None = None
                   ) -> dict[str, float]:
    """Per-layer keep fractions: ``config.rates`` first, then the allocation of ``config.keep``
    (:func:`prunekit.planning.allocation.allocate_rates`, in FLOPs with ``costs``); k-of-n keeps ``k / n``."""
    if config.pattern is Pattern.K_OF_N:
        return {name: config.k / config.n for name in layers}
    return allocate({n: m.weight for n, m in layers.items()}, config.pattern, config.keep, config.allocation,
                    config.rates, costs)


Weights = dict[str, torch.Tensor]
# Z = project(W + U) over all constrained layers at once: per layer for the per-tensor patterns, jointly for the
# group pattern (the channel groups couple layers).
Projection = Callable[[Weights], Weights]


def per_layer(project: Callable[[str, torch.Tensor], torch.Tensor]) -> Projection:
    return lambda weights: {n: project(n, w) for n, w in weights.items()}


RESIDUAL_CONVERGED = 0.01  # ADMM has converged when the hard projection would remove under 1% of the energy


@torch.no_grad()
def _removed_energy(layers: dict[str, nn.Module], project: Projection) -> float:
    """``||W - Pi(W)||^2 / ||W||^2`` over all constrained layers: the energy a hard projection now would remove
    (ADMM's purpose is to drive it to zero, so that the projection loses nothing)."""
    weights = {n: m.weight.detach() for n, m in layers.items()}
    projected = project(weights)
    num = sum(float((w - projected[n]).pow(2).sum()) for n, w in weights.items())
    den = sum(float(w.pow(2).sum()) for w in weights.values())
    return num / max(den, 1e-30)


class _ADMMHooks(TrainHooks):
    """ADMM's W-step as proximal gradient descent on ``loss(W) + rho/2 ||W - Z + U||^2``, and the Z/U updates.

    After every optimizer step on the loss, ``W <- (W + eta rho (Z - U)) / (1 + eta rho)`` (``eta``: the step's
    learning rate), the exact proximal step of the penalty: stable for any ``rho``, where an explicit gradient of
    the penalty diverges once ``eta rho`` passes about 2. Z and U are updated every ``update_every`` steps and at
    least once an epoch, ``rho`` rising geometrically from ``rho`` to ``rho_max`` over the phase's updates (the
    scaled dual ``U = lambda / rho`` rescaled with it, Boyd et al. 2011, section 3.4.1).
    """

    def __init__(self, layers: dict[str, nn.Module], project: Projection, config: ADMMConfig, steps_per_epoch: int,
                 masks: dict[str, torch.Tensor] | None = None) -> None:
        self.layers, self.project, self.masks = layers, project, masks
        self.update_every, self.rho, self.rho_max = config.update_every, config.rho, config.rho_max
        per_epoch = max(1, steps_per_epoch // self.update_every) if self.update_every else 1
        updates = config.admm_epochs * per_epoch
        self.growth = (config.rho_max / config.rho) ** (1 / (updates - 1)) if updates > 1 else 1.0
        self.Z = project({n: m.weight.detach().clone() for n, m in layers.items()})
        self.U = {n: torch.zeros_like(m.weight) for n, m in layers.items()}
        self.residuals: list[float] = []  # ||W - Z|| / ||W|| after every update
        self.energies: list[float] = []  # ||W - Pi(W)||^2 / ||W||^2 after every update
        self.updated_this_epoch = False

    @torch.no_grad()
    def update(self) -> None:
        self.Z = self.project({n: m.weight + self.U[n] for n, m in self.layers.items()})
        num = den = 0.0
        for n, m in self.layers.items():
            self.U[n] += m.weight - self.Z[n]
            num += float((m.weight - self.Z[n]).pow(2).sum())
            den += float(m.weight.pow(2).sum())
        self.residuals.append((num / max(den, 1e-30)) ** 0.5)
        self.energies.append(_removed_energy(self.layers, self.project))
        rho = min(self.rho * self.growth, self.rho_max)
        for u in self.U.values():  # U is the scaled dual lambda / rho: keep lambda as rho changes
            u.mul_(self.rho / rho)
        self.rho = rho
        self.updated_this_epoch = True

    def before_epoch(self, model: nn.Module, epoch: int) -> None:
        self.updated_this_epoch = False

    @torch.no_grad()
    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        pull = optimizer.param_groups[0]["lr"] * self.rho
        for n, m in self.layers.items():
            m.weight.add_(self.Z[n] - self.U[n], alpha=pull).div_(1 + pull)
        if self.masks is not None:
            _apply_masks_(self.layers, self.masks, optimizer)
        if self.update_every and (step + 1) % self.update_every == 0:
            self.update()

    def after_epoch(self, model: nn.Module, epoch: int) -> None:
        if not self.updated_this_epoch:
            self.update()

@torch.no_grad()
def _apply_masks_(layers: dict[str, nn.Module], masks: dict[str, torch.Tensor],
                  optimizer: torch.optim.Optimizer | None = None) -> None:
    for n, m in layers.items():
        m.weight.mul_(masks[n])
        if optimizer is not None:
            state = optimizer.state.get(m.weight, {})
            if "momentum_buffer" in state and state["momentum_buffer"] is not None:
                state["momentum_buffer"].mul_(masks[n])


class MaskedRetrain(TrainHooks):
    """Keeps removed weights (and their momentum) at zero after every optimizer step."""

    def __init__(self, layers: dict[str, nn.Module], masks: dict[str, torch.Tensor]) -> None:
        self.layers, self.masks = layers, masks

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        _apply_masks_(self.layers, self.masks, optimizer)


@dataclass
class ADMMResult:
    """Masks and quantization scales of the constrained layers, and what happened in every phase.

    ``residuals``: per stage (``stage-1``, ...), ``prune`` holds the primal residual ``||W - Z|| / ||W||`` and
    ``removed_energy_per_update`` the energy ``||W - Pi(W)||^2 / ||W||^2`` that a hard projection would remove,
    after every Z/U update, and ``removed_energy`` that energy before and after ADMM; ``quant`` the quantization
    phase's. ``stages``: one summary per stage run (keep, kept fraction, validation accuracy, removed energy,
    converged); ``selected`` the index of the stage whose model was kept.
    """

    masks: dict[str, torch.Tensor]
    rates: dict[str, float]
    scales: dict[str, float] = field(default_factory=dict)
    residuals: dict[str, Any] = field(default_factory=dict)
    history: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    change: dict[str, Any] | None = None
    original_size: int | None = None
    dense_bits: int | None = None  # float32 bits of every parameter before pruning (the compression reference)
    stages: list[dict[str, Any]] = field(default_factory=list)
    selected: int = 0

    def kept_fraction(self) -> float:
        """Kept constrained weights over those before pruning (physically removed ones count as removed)."""
        total = self.original_size or sum(m.numel() for m in self.masks.values())
        return sum(float(m.sum()) for m in self.masks.values()) / max(total, 1)

    def unconverged(self) -> list[dict[str, Any]]:
        """The stages whose ADMM phase ended with the hard projection removing more than 1% of the energy."""
        return [s for s in self.stages if s.get("converged") is False]


class GroupProjection:
    """The group pattern's projection: zero the lowest-norm coupled channel groups until ``target`` (a FLOPs or
    params fraction of the whole model) is met.

    A channel of a coupled group is every slice that removing it takes away (the conv producing it, the convs
    reading it across residual adds, the classifier columns), so ADMM drives exactly what the structural engine
    can remove physically. Scores are the L2 norm over those slices (:class:`~prunekit.channels.criteria.Magnitude` with
    ``p=2`` on ``W + U``), allocation is global as in :func:`prunekit.planning.allocation.plan_for_target`.
    """

    def __init__(self, model: nn.Module, layers: dict[str, nn.Module], example: torch.Tensor, target: Target,
                 ignore: tuple[str, ...] = ()) -> None:
        self.graph = ChannelGraph(model, example, ignore=ignore)
        if not self.graph.groups:
            raise ValueError("the group pattern found no prunable channel group in this model")
        self.cost = CostModel(model, self.graph, tuple(example.shape[1:]))
        self.target = target
        self.params = {f"{n}.weight": n for n in layers}

    def plan(self, weights: Weights) -> ChannelPlan:
        by_param = {p: weights[n] for p, n in self.params.items() if n in weights}
        scores = {g.root: g.reduce(lambda s: s.rows(by_param.get(s.name)).pow(2).sum(1)).sqrt()
                  for g in self.graph.groups}
        return plan_for_target(scores, self.cost, self.target)[0]

    def masks(self, plan: ChannelPlan, weights: Weights) -> Weights:
        by_param = self.graph.masks(plan)
        return {n: by_param.get(f"{n}.weight", torch.ones_like(w)).to(w.dtype) for n, w in weights.items()}

    def __call__(self, weights: Weights) -> Weights:
        masks = self.masks(self.plan(weights), weights)
        return {n: w * masks[n] for n, w in weights.items()}


PhaseOutput = tuple[dict[str, torch.Tensor], dict[str, Any]]  # a phase's tensors and JSON record


def admm_prune_(model: nn.Module, data: DataSplits, config: ADMMConfig, train: TrainConfig, *,
                progress: bool = True, log: Callable[[str], None] = print, phases: Phases | None = None
                ) -> ADMMResult:
    """ADMM pruning (then, with ``config.quant``, ADMM quantization) of ``model`` in place, with retraining.

    Every stage of ``config.stages`` (one without stages) is ADMM, the hard projection and masked retraining, the
    zeros of earlier stages kept; with a stage tolerance the run stops after the first stage beyond it on
    validation and keeps the stage before. ``train`` gives the optimiser settings; its ``epochs`` are replaced by
    each phase's own. With the group pattern the chosen channels are removed physically after ADMM
    (``result.change`` is the replayable plan). With ``phases`` (a folder) every phase's end state is saved, so a
    resumed run skips the finished ones.
    """
    phases = phases or Phases(None)
    example = data.train[:2][0]
    layers = constrained_layers(model, config, example)
    if not layers:
        raise ValueError("ADMM found no Conv/Linear layer to constrain (all ignored?)")
    result = ADMMResult(masks={}, rates={}, original_size=sum(m.weight.numel() for m in layers.values()),
                        dense_bits=32 * sum(p.numel() for p in model.parameters()))
    steps = math.ceil(len(data.train) / train.batch_size)
    if config.pattern is Pattern.GROUP:
        _group_stage(model, data, config, train, layers, example, result, steps, progress, log, phases)
    else:
        _weight_stages(model, data, config, train, layers, example, result, steps, progress, log, phases)
    if config.quant.kind is not QuantKind.NONE:
        _quantize_(model, data, config, train, layers, result, progress, log, phases, steps)
    return result


def admm_training(train: TrainConfig, config: ADMMConfig) -> TrainConfig:
    """An ADMM phase trains at a constant learning rate: the W-step must keep pulling W to ``Z - U`` as rho rises,
    which a rate decayed to zero at the end of the phase would stop."""
    return replace(train, epochs=config.admm_epochs, schedule=Schedule.STEP, milestones=(), warmup=0.0)


def _run_stage(model: nn.Module, data: DataSplits, config: ADMMConfig, train: TrainConfig,
               layers: dict[str, nn.Module], project: Projection, hard: Callable[[], PhaseOutput], keep: float,
               prefix: str, result: ADMMResult, steps: int, progress: bool, log, phases: Phases,
               earlier: dict[str, torch.Tensor] | None = None,
               replay: Callable[[dict[str, Any]], None] = lambda record: None) -> PhaseOutput:
    """One stage: ADMM towards ``project`` (zeros of ``earlier`` masks kept), the hard projection ``hard()``
    (returns the masks and a record), masked retraining. Records the residuals under ``prefix``."""
    residuals: dict[str, Any] = {"removed_energy": [_removed_energy(layers, project)]}
    if config.admm_epochs:
        def admm_phase() -> PhaseOutput:
            hooks = _ADMMHooks(layers, project, config, steps, earlier)
            log(f"ADMM pruning: {config.admm_epochs} epoch(s), Z/U every {config.update_every or steps} steps, "
                f"rho {config.rho:g} -> {config.rho_max:g}")
            r = fit(model, data, admm_training(train, config), progress=progress, hooks=hooks, select_best=False)
            return {}, {"history": r.history, "residuals": hooks.residuals, "energies": hooks.energies,
                        "removed_energy": _removed_energy(layers, project)}

        done = phases.run(f"{prefix}admm-prune", model, admm_phase)[1]
        result.history[f"{prefix}admm_prune"], residuals["prune"] = done["history"], done["residuals"]
        residuals["removed_energy_per_update"] = done.get("energies", [])
        residuals["removed_energy"].append(done["removed_energy"])
        log(f"ADMM left {done['removed_energy']:.4f} of the weights' energy for the hard projection to remove")
    masks, record = phases.run(f"{prefix}projection", model, hard, prepare=replay)
    result.masks, result.rates, result.change = masks, record["rates"], record["change"]
    log(f"hard projection: keeps {result.kept_fraction():.4f} of the constrained weights "
        f"({1 / max(result.kept_fraction(), 1e-12):.1f}x)")
    if config.retrain_epochs:
        def retrain() -> PhaseOutput:
            r = fit(model, data, replace(train, epochs=config.retrain_epochs), progress=progress,
                    hooks=MaskedRetrain(layers, masks))
            return {}, {"history": r.history}

        result.history[f"{prefix}retrain"] = phases.run(f"{prefix}retrain", model, retrain)[1]["history"]
    result.residuals[prefix.rstrip("-") or "stage-1"] = residuals
    after = residuals["removed_energy"][-1]
    result.stages.append({"keep_target": keep, "kept_fraction": result.kept_fraction(),
                          "removed_energy": after,
                          "converged": after <= RESIDUAL_CONVERGED if config.admm_epochs else None})
    return masks, record


def _group_stage(model: nn.Module, data: DataSplits, config: ADMMConfig, train: TrainConfig,
                 layers: dict[str, nn.Module], example: torch.Tensor, result: ADMMResult, steps: int, progress: bool,
                 log, phases: Phases) -> None:
    """The group pattern: ADMM towards whole coupled channels, which the projection removes physically."""
    group = GroupProjection(model, layers, example, config.target, config.ignore)

    def hard() -> PhaseOutput:
        weights = {n: m.weight.detach() for n, m in layers.items()}
        plan = group.plan(weights)
        group.graph.shrink_(plan)  # verified against masking; the graph is spent after this
        log(f"removed {plan.num_removed()} coupled channels physically")
        return ({n: torch.ones_like(m.weight) for n, m in layers.items()},
                {"change": plan.to_dict(), "rates": {n: m.weight.numel() / weights[n].numel()
                                                     for n, m in layers.items()}})

    def replay(record: dict[str, Any]) -> None:
        ChannelGraph(model, example, ignore=config.ignore, probe=False).shrink_(
            ChannelPlan.from_dict(record["change"]), verify=False)

    _run_stage(model, data, config, train, layers, group, hard, config.target.keep, "", result, steps, progress, log,
               phases, replay=replay)


def _weight_stages(model: nn.Module, data: DataSplits, config: ADMMConfig, train: TrainConfig,
                   layers: dict[str, nn.Module], example: torch.Tensor, result: ADMMResult, steps: int,
                   progress: bool, log, phases: Phases) -> None:
    """The weight patterns, stage by stage; each stage's model is kept until a later one passes the tolerance."""
    flops = config.target is not None and config.target.metric is TargetMetric.FLOPS
    costs = weight_costs(model, layers, tuple(example.shape[1:])) if flops else None
    check_feasible(layers, config, costs)
    keeps = config.stages.keeps(config.target) if config.target is not None else [config.keep]
    dense_val = evaluate(model, data.val)["acc"] if config.stages.tolerance is not None else None
    earlier: dict[str, torch.Tensor] | None = None
    best: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, float], int] | None = None
    for i, keep in enumerate(keeps):
        prefix = f"stage-{i + 1}-" if len(keeps) > 1 else ""
        if len(keeps) > 1:
            log(f"stage {i + 1}/{len(keeps)}: keep {keep:.4g} of the weights (x{1 / keep:g})")
        rates = stage_rates(model, data, layers, config, keep, costs, earlier)
        # a layer whose allocated rate keeps everything is left dense
        constraints = {n: config.constraint(rates[n]) for n in layers if rates[n] < 1}

        def layer_mask(name: str, w: torch.Tensor, constraints=constraints, earlier=earlier) -> torch.Tensor:
            mask = sparsity_mask(w, constraints[name]) if name in constraints else torch.ones_like(w)
            return mask if earlier is None else mask * earlier[name]

        def hard(rates=rates, layer_mask=layer_mask) -> PhaseOutput:
            masks = {n: layer_mask(n, m.weight.detach()) for n, m in layers.items()}
            _apply_masks_(layers, masks)
            return masks, {"change": None, "rates": rates}

        project = per_layer(lambda name, w, layer_mask=layer_mask: w * layer_mask(name, w))
        earlier = _run_stage(model, data, config, train, layers, project, hard, keep, prefix, result, steps, progress,
                             log, phases, earlier)[0]
        summary = result.stages[-1]
        summary["val_acc"] = evaluate(model, data.val)["acc"]
        if dense_val is not None and not config.stages.within(summary["val_acc"], dense_val):
            summary["within_tolerance"] = False
            log(f"stage {i + 1} lost {100 * (dense_val - summary['val_acc']):.2f} validation points, beyond the "
                f"tolerance of {config.stages.tolerance:g}")
            if best is not None:  # the last stage within the tolerance: its weights, masks and rates
                state, result.masks, result.rates, result.selected = best
                model.load_state_dict(state)
                log(f"kept stage {result.selected + 1} (x{1 / keeps[result.selected]:g})")
            break
        summary["within_tolerance"] = None if dense_val is None else True
        result.selected = i
        if i + 1 < len(keeps) and dense_val is not None:
            best = ({k: v.detach().clone() for k, v in model.state_dict().items()}, result.masks, result.rates, i)


SENSITIVITY_EXAMPLES = 2048  # validation examples the sensitivity allocation evaluates each probe on


def stage_rates(model: nn.Module, data: DataSplits, layers: dict[str, nn.Module], config: ADMMConfig, keep: float,
                costs: dict[str, float] | None, earlier: dict[str, torch.Tensor] | None) -> dict[str, float]:
    """Per-layer keep fractions of one stage keeping ``keep`` of the weights (of their FLOPs with ``costs``):
    ``config.rates`` (explicit, reached geometrically over the stages: ``rate ** (log keep / log target)``) for the
    layers it names, the allocation for the others; k-of-n keeps ``k / n``."""
    if config.pattern is Pattern.K_OF_N:
        return {name: config.k / config.n for name in layers}
    final = config.keep
    fixed = {n: r ** (math.log(keep) / math.log(final)) for n, r in config.rates.items()}
    weights = {n: m.weight.detach() for n, m in layers.items()}
    if config.allocation is not Allocation.SENSITIVITY:
        return allocate(weights, config.pattern, keep, config.allocation, fixed, costs)
    probe = Subset(data.val, range(min(len(data.val), SENSITIVITY_EXAMPLES)))

    @torch.no_grad()
    def loss_with(name: str, fraction: float) -> float:
        w = layers[name].weight
        saved = w.detach().clone()
        if fraction < 1:
            w.mul_(sparsity_mask(w, config.constraint(fraction)))
        try:
            return evaluate(model, probe)["loss"]
        finally:
            w.copy_(saved)

    rates = sensitivity_rates(weights, config.pattern, keep, loss_with, fixed, costs)
    if earlier is not None:  # never keep more than an earlier stage did
        rates = {n: min(r, float(earlier[n].mean())) if n not in fixed else r for n, r in rates.items()}
    return rates


def _quantize_(model: nn.Module, data: DataSplits, config: ADMMConfig, train: TrainConfig,
               layers: dict[str, nn.Module], result: ADMMResult, progress: bool, log, phases: Phases,
               steps: int) -> None:
    """ADMM towards the levels on the kept weights, then progressive partial quantization with retraining."""
    quant, masks = config.quant, result.masks

    def quant_projection(name: str, w: torch.Tensor) -> torch.Tensor:
        return quant.project(w, masks[name])[0]

    if config.admm_epochs:
        def admm_phase() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
            hooks = _ADMMHooks(layers, per_layer(quant_projection), config, steps, masks)
            log(f"ADMM quantization ({quant}): {config.admm_epochs} epoch(s)")
            r = fit(model, data, admm_training(train, config), progress=progress, hooks=hooks, select_best=False)
            return {}, {"history": r.history, "residuals": hooks.residuals, "energies": hooks.energies,
                        "removed_energy": _removed_energy(layers, per_layer(quant_projection))}

        done = phases.run("admm-quant", model, admm_phase)[1]
        result.history["admm_quant"] = done["history"]
        result.residuals["quant"] = {"prune": done["residuals"], "removed_energy_per_update": done.get("energies", []),
                                     "removed_energy": [done["removed_energy"]]}
    # fix the levels (q per layer) now; progressively quantize the weights closest to their level
    scales: dict[str, float] = phases.run("quant-levels", model, lambda: ({}, {
        "scales": {n: quant.project(m.weight.detach(), masks[n])[1] for n, m in layers.items()}}))[1]["scales"]
    fixed = {n: torch.zeros_like(masks[n], dtype=torch.bool) for n in layers}
    for i, frac in enumerate(config.quant_steps):
        def step(frac: float = frac, fixed: dict[str, torch.Tensor] = fixed
                 ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
            with torch.no_grad():
                for n, m in layers.items():
                    err = (m.weight - _nearest_level(m.weight, scales[n], quant)).abs()
                    err = torch.where(masks[n].bool(), err, torch.full_like(err, float("inf")))
                    kept = int(masks[n].sum())
                    count = max(int(round(frac * kept)), int(fixed[n].sum()))
                    chosen = torch.topk(-err.reshape(-1), count).indices if count else \
                        torch.zeros(0, dtype=torch.long)
                    fixed[n].view(-1)[chosen] = True
                    m.weight.copy_(torch.where(fixed[n], _nearest_level(m.weight, scales[n], quant), m.weight))
            # after the last step every weight is fixed and one epoch retrains what stays float (biases, norms)
            steps_history = []
            if train.epochs:
                r = fit(model, data, replace(train, epochs=1), progress=progress,
                        hooks=_FixedWeights(layers, masks, fixed))
                steps_history = r.history
            return {n: f for n, f in fixed.items()}, {"history": steps_history}

        tensors, done = phases.run(f"quant-step-{i + 1}", model, step)
        fixed = {n: tensors[n].bool() for n in layers}
        if done["history"]:
            result.history.setdefault("progressive_quant", []).extend(done["history"])
    result.scales = scales
    log(f"quantized to {quant}: every kept weight on its layer's levels")


def _nearest_level(w: torch.Tensor, q: float, quant: QuantConstraint) -> torch.Tensor:
    """Each entry's nearest allowed level (zero only for ternary)."""
    if quant.kind is QuantKind.TERNARY:
        return torch.where(w.abs() > q / 2, w.sign() * q, torch.zeros_like(w))
    m = 1 if quant.kind is QuantKind.BINARY else 2 ** (quant.bits - 1)
    return w.sign() * (w.abs() / q).round().clamp(1, m) * q


class _FixedWeights(TrainHooks):
    """Masked retraining in which the already-quantized weights do not move either."""

    def __init__(self, layers: dict[str, nn.Module], masks: dict[str, torch.Tensor],
                 fixed: dict[str, torch.Tensor]) -> None:
        self.layers, self.masks, self.fixed = layers, masks, fixed
        self.values = {n: m.weight.detach().clone() for n, m in layers.items()}

    @torch.no_grad()
    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        _apply_masks_(self.layers, self.masks, optimizer)
        for n, m in self.layers.items():
            m.weight.copy_(torch.where(self.fixed[n], self.values[n], m.weight))


def storage_report(model: nn.Module, result: ADMMResult, config: ADMMConfig, gap_bits: int = 5) -> dict[str, Any]:
    """Exact storage of ``model`` after ADMM in every applicable format (:func:`format_storage`)."""
    k_of_n = (config.k, config.n) if config.pattern is Pattern.K_OF_N else None
    from prunekit.measurement.formats import format_storage

    return format_storage(model, list(result.masks), config.quant.code_bits, result.scales, k_of_n, gap_bits,
                          result.dense_bits)


def _all_zero(size: int, slices: list) -> torch.Tensor:
    """Per group channel: True when every one of ``slices`` is zero for it."""
    mass = torch.zeros(size, dtype=torch.float64)
    for s in slices:
        mass.index_add_(0, s.root_idxs, s.rows().abs().sum(1).double().cpu())
    return mass == 0


def zero_channel_plan(graph: ChannelGraph) -> ChannelPlan:
    """The channels whose physical removal changes no output: every layer reading them has all-zero weights for
    them (what channel-pattern ADMM leaves), or, in a group without normalisation layers, every slice producing
    them is zero (filter pattern; with BatchNorm the channel still carries its shift beta, so it stays). At least
    one channel (one tied unit) of every group is kept."""
    removed: dict[str, tuple[int, ...]] = {}
    for g in graph.groups:
        readers = [s for m in g.members if m.kind is SliceKind.IN for s in m.slices]
        producers = [s for m in g.members if m.kind is SliceKind.OUT for s in m.slices]
        has_norm = any(s.is_norm for s in g.slices(include_norm=True))

        free = torch.zeros(g.size, dtype=torch.bool)
        if readers:
            free |= _all_zero(g.size, readers)
        if producers and not has_norm:
            free |= _all_zero(g.size, producers)
        units = [u for u in g.units if all(bool(free[c]) for c in u)]
        if len(units) == len(g.units):
            units = units[1:]  # keep one unit
        if units:
            removed[g.root] = tuple(sorted(c for u in units for c in u))
    return ChannelPlan(removed)


def shrink_zero_channels_(model: nn.Module, example: torch.Tensor, ignore: tuple[str, ...] = ()) -> ChannelPlan:
    """Remove, physically and exactly (verified against masking), the channels :func:`zero_channel_plan` finds;
    returns the plan (its ``to_dict()`` is the architecture change to save)."""
    graph = ChannelGraph(model, example, ignore=ignore)
    plan = zero_channel_plan(graph)
    if plan:
        graph.shrink_(plan)
    return plan


def admm_(model: nn.Module, data: DataSplits, config: ADMMConfig, ctx: RunContext) -> PruneRecord:
    """ADMM-NN-S on ``model`` in place (the ``apply`` of the ``admm`` method): ADMM, hard projection, masked
    retraining and, with ``config.quant``, ADMM quantization; the filter and channel patterns then remove their
    all-zero channels physically where that is exact. Every phase is saved in the context's folder, so a resumed
    run loses at most the phase it was in."""
    torch.manual_seed(ctx.seed)
    train = replace(ctx.train, epochs=1, seed=ctx.seed)
    result = admm_prune_(model, data, config, train, progress=ctx.progress, log=ctx.log,
                         phases=Phases(ctx.subfolder("phases"), ctx.log))
    record = PruneRecord(method=config.method)
    if result.change is not None:  # group pattern: the coupled channels are already gone
        record.changes = [result.change]
    elif config.pattern in (Pattern.FILTER, Pattern.CHANNEL):  # structured zeros leave the model where exact
        plan = shrink_zero_channels_(model.eval(), data.train[:2][0], config.ignore)
        if plan:
            record.changes = [plan.to_dict()]
            ctx.log(f"removed {plan.num_removed()} all-zero channels physically (exact, verified against masking)")
    model.eval()
    masked = [n for n, m in result.masks.items() if m.numel() and not bool(m.all())] if result.change is None else []
    # the constrained layers, shrunk or masked: their zeros (if any) and their codes are part of the format
    record.encoding = {"quant": str(config.quant), "scales": result.scales, "masked_layers": list(result.masks)}
    if config.pattern is Pattern.K_OF_N:
        record.encoding["k_of_n"] = {name: [config.k, config.n] for name in result.masks}
    record.rounds = [{"phase": phase, **row} for phase, rows in result.history.items() for row in rows]
    record.results = {"rates": result.rates, "residuals": result.residuals, "kept_fraction": result.kept_fraction(),
                      "zeroed_layers": masked, "stages": result.stages, "selected_stage": result.selected + 1,
                      "converged": not result.unconverged() if config.admm_epochs else None}
    record.notes = [
        f"ADMM {config.admm_epochs} epoch(s) per stage, Z/U every {config.update_every or 'epoch'} step(s), rho "
        f"{config.rho:g} -> {config.rho_max:g}, then {config.retrain_epochs} masked retraining epoch(s); model "
        "chosen on validation",
        f"kept {result.kept_fraction():.4f} of the constrained weights ({1 / max(result.kept_fraction(), 1e-12):.1f}x)"]
    if len(result.stages) > 1 or config.stages.tolerance is not None:
        record.notes.append("stages: " + ", ".join(
            f"x{1 / s['keep_target']:g} val acc {s['val_acc']:.4f}" + (" (beyond tolerance)" if s.get(
                "within_tolerance") is False else "") for s in result.stages)
            + f"; kept stage {result.selected + 1}" + (" (no stage stayed within the tolerance)" if all(
                s.get("within_tolerance") is False for s in result.stages) else ""))
    for s in result.unconverged():
        record.notes.append(
            f"ADMM ended unconverged at x{1 / s['keep_target']:g}: the hard projection removed "
            f"{100 * s['removed_energy']:.1f}% of the weights' energy (converged is under "
            f"{100 * RESIDUAL_CONVERGED:g}%); give more admm_epochs, a larger rho_max or a smaller update_every")
    if config.admm_epochs:
        from prunekit.measurement.plots import plot_admm_residuals

        record.figures["admm_residuals.png"] = lambda path: plot_admm_residuals(result.residuals, path,
                                                                                title=config.label())
    return record


register(MethodSpec("admm", ADMMConfig, admm_,
                    "Ma et al. 2019, Non-structured DNN Weight Pruning -- Is It Beneficial in Any Platform?, "
                    "arXiv 1907.02124 (ADMM-NN-S)",
                    "ADMM joint pruning (any pattern) and quantization, with masked retraining",
                    lr=0.01, warmup=0.0))  # the rate benchmarks/admm.py measured ADMM at (its phases: constant)
