"""Dynamic Probabilistic Pruning (Gonzalez-Carabarin et al. 2021, arXiv 2105.12686): learned k-out-of-n masks.

Every constrained group (a run of ``n`` weights of a row, the ``C_in`` kernels of a filter, the filters of a
layer) has trainable logits ``phi`` (length ``n``). In training each forward draws an exact k-hot mask by Gumbel
top-k of ``phi + s * Gumbel``; the backward pass goes through the relaxed sequential soft top-k (k softmaxes at
temperature ``T``, each discounting what was already chosen: ``a_j = softmax((z + log(1 - sum_{i<j} a_i)) / T)``,
Xie & Ermon 2019, arXiv 1901.10517) with the straight-through estimator, so the forward stays exactly k-hot.
Evaluation uses the deterministic top-k of ``phi``. ``T`` is annealed per epoch (:class:`TemperatureSchedule`).

Metrics (per layer, both in [0, 1], logarithms normalised by ``log n``):

* confidence ``= 1 - mean_g H(softmax(phi_g)) / log n``: 0 for uniform logits, 1 when every group is certain;
* diversity ``= (H(mean_g softmax(phi_g)) - mean_g H(softmax(phi_g))) / log n``: how differently the groups choose
  (0 when they all have the same distribution, 1 when certain groups spread their choices evenly).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.configs import Config, coerce_fields
from prunekit.methods.registry import MethodSpec, PruneRecord, RunContext, register
from prunekit.planning.allocation import Target, TargetMetric, plan_k_of_n, refuse_latency_target, weight_costs
from prunekit.planning.constraints import QuantConstraint, QuantKind
from prunekit.planning.pattern import Pattern, check_pattern
from prunekit.planning.schedule import TemperatureSchedule
from prunekit.training import TrainHooks


def gumbel_topk_mask(logits: torch.Tensor, k: int, temperature: float, noise_scale: float = 1.0,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Exactly k-hot masks over the last dimension of ``logits`` (forward), with gradients of the relaxed
    sequential soft top-k at ``temperature`` (straight-through)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    u = torch.rand(logits.shape, generator=generator, dtype=logits.dtype, device=logits.device)
    gumbel = -torch.log(-torch.log(u.clamp(1e-20, 1 - 1e-7)))
    z = logits + noise_scale * gumbel
    hard = torch.zeros_like(z).scatter_(-1, torch.topk(z.detach(), k, dim=-1).indices, 1.0)
    soft = torch.zeros_like(z)
    taken = torch.zeros_like(z)
    for _ in range(k):
        a = torch.softmax((z + torch.log((1 - taken).clamp_min(1e-20))) / temperature, dim=-1)
        soft = soft + a
        taken = (taken + a).clamp(max=1.0)
    return hard + (soft - soft.detach())  # exactly k-hot forward (x - x == 0), relaxed gradients


def topk_mask(logits: torch.Tensor, k: int) -> torch.Tensor:
    """The deterministic k-hot mask of the ``k`` largest logits (evaluation)."""
    return torch.zeros_like(logits).scatter_(-1, torch.topk(logits, k, dim=-1).indices, 1.0)


def mask_confidence(logits: torch.Tensor) -> float:
    """``1 - mean_g H(softmax(phi_g)) / log n`` (groups along the first dimension)."""
    p = torch.softmax(logits.detach().double(), -1)
    h = -(p * p.clamp_min(1e-300).log()).sum(-1)
    return float(1 - h.mean() / math.log(logits.shape[-1]))


def mask_diversity(logits: torch.Tensor) -> float:
    """``(H(mean_g p_g) - mean_g H(p_g)) / log n``: how differently the groups choose."""
    p = torch.softmax(logits.detach().double().reshape(-1, logits.shape[-1]), -1)
    h = -(p * p.clamp_min(1e-300).log()).sum(-1)
    mean = p.mean(0)
    h_mean = -(mean * mean.clamp_min(1e-300).log()).sum()
    return float((h_mean - h.mean()) / math.log(logits.shape[-1]))


DPP_PATTERNS = (Pattern.K_OF_N, Pattern.KERNEL, Pattern.FILTER, Pattern.GROUP)


class LogitInit(str, enum.Enum):
    """Where the mask logits start: from the weights' magnitudes, or random normal (the authors' code)."""

    MAGNITUDE = "magnitude"
    NORMAL = "normal"


class LogitOptimizer(str, enum.Enum):
    """How the logits learn: in the weights' SGD at ``logit_lr_scale`` times their rate, or by their own Adam (the
    authors' code) at ``logit_lr_scale`` times the scheduled rate."""

    SGD = "sgd"
    ADAM = "adam"


@dataclass(frozen=True)
class DPPConfig(Config):
    """DPP settings.

    Args:
        pattern: What one k-of-n group is: ``k-of-n`` (``n`` consecutive weights of a row), ``kernel`` (the
            ``C_in`` kernels of a filter), ``filter`` (the filters of a layer, zeroed) or ``group`` (the filters of
            every coupled channel group, removed physically; needs a target).
        k: Keep ``k`` of every ``n``.
        n: Run length for the k-of-n pattern (kernel and filter groups use the layer's own size).
        tiles: k-of-n pattern: split each row into this many tiles, ``k`` of ``n = row / tiles`` in each.
        target: Instead of ``k``/``n``: ``params=F`` (or ``flops=F``) plans one k-of-n per layer keeping about ``F``
            of the weights (of their FLOPs); layers under 2% of the weights stay dense. With the group pattern, the
            FLOPs, parameters or channels kept.
        quant: Train the kept weights quantized too: ``none``, ``binary`` or ``bits=N`` (2 <= N <= 16), by
            straight-through estimators.
        epochs: Epochs of joint mask and weight training (best epoch on validation).
        temperature: Annealing of the Gumbel-softmax temperature over the epochs.
        noise_scale: ``s`` in ``phi + s * Gumbel``.
        anneal_noise: Scale ``s`` with the temperature, ``s * T(epoch) / T(0)``, so the draws settle on
            ``top-k(phi)`` as the relaxation sharpens and the last epochs train the weights under (nearly) the mask
            that evaluation uses.
        entropy_weight: Weight of the mean logit entropy added to the loss (0: off).
        logit_init: ``magnitude``: logits start at ``init_scale * log(1 + |w| / mean|w|)`` per group (a
            magnitude-informed start); ``normal``: at ``init_scale * N(0, 1)`` (the authors' start).
        init_scale: Scale of the logits' start (see ``logit_init``).
        logit_optimizer: ``sgd`` (with the weights) or ``adam`` (the logits' own Adam, as the authors train them).
        logit_lr_scale: The logits' learning rate, as a multiple of the weights' scheduled rate (logits never get
            weight decay, which would only flatten them toward the uniform mask).
        ignore: Modules to leave alone, containers included.
    """

    pattern: Pattern = field(default=Pattern.K_OF_N, metadata={"choices": DPP_PATTERNS})
    k: int | None = None
    n: int | None = None
    tiles: int | None = None
    target: Target | None = None
    quant: QuantConstraint = QuantConstraint()
    epochs: int = 4
    temperature: TemperatureSchedule = TemperatureSchedule()
    noise_scale: float = 1.0
    anneal_noise: bool = False
    entropy_weight: float = 0.0
    logit_init: LogitInit = LogitInit.MAGNITUDE
    init_scale: float = 1.0
    logit_optimizer: LogitOptimizer = LogitOptimizer.SGD
    logit_lr_scale: float = 1.0
    ignore: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        ste_quantizer(self.quant)  # refuses what DPP cannot train, in DPP's words
        coerce_fields(self)
        object.__setattr__(self, "pattern", check_pattern(self.pattern, DPP_PATTERNS, "DPP"))
        object.__setattr__(self, "ignore", tuple(self.ignore))
        if self.target is not None:
            if self.k is not None or self.n is not None:
                raise ValueError("DPP takes either k and n or a target (params=FRACTION plans k of n per layer, the "
                                 f"group pattern's target sets k per group), not both; got k={self.k}, n={self.n}, "
                                 f"target {self.target}")
        elif self.k is None:  # neither given: keep 1 of 4 (the k-of-n run) or 1 kernel/filter
            object.__setattr__(self, "k", 1)
            if self.n is None and self.pattern is Pattern.K_OF_N and not self.tiles:
                object.__setattr__(self, "n", 4)
        if self.k is not None and (isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1):
            raise ValueError(f"k must be an int >= 1, got {self.k!r}")
        if self.n is not None and self.pattern in (Pattern.KERNEL, Pattern.FILTER):
            raise ValueError(f"the {self.pattern.value} pattern takes k of a layer's own "
                             f"{'input kernels' if self.pattern is Pattern.KERNEL else 'filters'}; n is for k-of-n")
        if self.n is not None and self.k is not None and self.k >= self.n:
            raise ValueError(f"k must be smaller than n (keep k of every n), got k={self.k}, n={self.n}")
        if self.tiles is not None and (self.tiles < 1 or self.pattern is not Pattern.K_OF_N):
            raise ValueError(f"tiles must be >= 1 and needs the k-of-n pattern, got tiles={self.tiles!r}")
        if self.tiles is not None and self.n is not None:
            raise ValueError("tiles sets n (n = row / tiles in every layer); give tiles or n, not both")
        if self.pattern is Pattern.K_OF_N and self.target is None and self.n is None and self.tiles is None:
            raise ValueError(f"the k-of-n pattern keeps k of every n weights: give n (or tiles) with k={self.k}, or "
                             "a params= target")
        if self.temperature.floor >= self.temperature.start:
            raise ValueError(f"the temperature floor {self.temperature.floor:g} is not below the starting temperature "
                             f"{self.temperature.start:g}, so the schedule would never apply; lower "
                             "--temperature-floor")
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"DPP trains masks and weights together: epochs must be an int >= 1, got {self.epochs!r}")
        for name in ("noise_scale", "entropy_weight", "init_scale"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0 <= value <= 1e4):
                raise ValueError(f"{name} must be a finite number >= 0 and at most 1e4, got {value!r}")
        if not (math.isfinite(self.logit_lr_scale) and 0 < self.logit_lr_scale <= 1e6):
            raise ValueError(f"logit_lr_scale must be > 0 and finite, at most 1e6 (the tuned LeNet value is 5000), "
                             f"got {self.logit_lr_scale!r}")
        refuse_latency_target(self.target, "dpp")
        if self.pattern is Pattern.GROUP:
            if self.target is None:
                raise ValueError("the DPP group pattern needs a target (e.g. flops=x4): every coupled group keeps the "
                                 "same fraction of its filters, so k follows from the target")
            if self.quant.kind is not QuantKind.NONE:
                raise ValueError("the DPP group pattern trains float weights; quantize with the k-of-n, kernel or "
                                 "filter pattern")
        elif self.target is not None and (self.pattern is not Pattern.K_OF_N or self.tiles
                                          or self.target.metric is TargetMetric.CHANNELS):
            raise ValueError("a DPP target plans k of n per layer for the k-of-n pattern without tiles and must be "
                             "params=FRACTION or flops=FRACTION (e.g. params=0.1 keeps a tenth of the weights), got "
                             f"{self.target}")

    def temperature_at(self, epoch: int) -> float:
        """The temperature of ``epoch`` (0-based)."""
        return self.temperature.at(epoch, self.epochs)

    def noise_at(self, epoch: int) -> float:
        """The Gumbel noise scale of ``epoch`` (0-based)."""
        if not self.anneal_noise:
            return self.noise_scale
        return self.noise_scale * self.temperature_at(epoch) / self.temperature_at(0)

    def label(self) -> str:
        """How the report names the run: ``dpp k-of-n 1-of-4 bits=8``, ``dpp group flops=0.25``."""
        what = str(self.target) if self.target is not None else f"{self.k}-of-{self.n if self.n else 'n'}"
        return f"dpp {self.pattern.value} {what}" + (f" {self.quant}" if self.quant.kind is not QuantKind.NONE else "")


def group_layout(weight_shape: torch.Size | tuple[int, ...], config: DPPConfig) -> tuple[int, int]:
    """``(groups, n)`` of a weight under ``config``.

    Raises:
        ValueError: ``n`` does not divide the row, or ``k >= n`` for the layer's own ``n``.
    """
    out = weight_shape[0]
    row = math.prod(weight_shape[1:])
    g = config.pattern
    if g is Pattern.FILTER:
        n = out
        groups = 1
    elif g is Pattern.KERNEL:
        if len(weight_shape) != 4:
            raise ValueError(f"the kernel pattern needs a Conv2d weight, got shape {tuple(weight_shape)}")
        n, groups = weight_shape[1], out
    else:
        if config.tiles and row % config.tiles:
            raise ValueError(f"tiles={config.tiles} must divide the row length {row} of a weight "
                             f"{tuple(weight_shape)}")
        n = row // config.tiles if config.tiles else config.n
        if n is None or row % n:
            raise ValueError(f"n={n} must divide the row length {row} of a weight {tuple(weight_shape)}"
                             + (f" ({config.tiles} tiles)" if config.tiles else "") + "; pick n dividing it")
        groups = out * (row // n)
    if config.k >= n:
        raise ValueError(f"k={config.k} must be smaller than n={n} for a weight {tuple(weight_shape)}")
    return groups, n


def initial_logits(scores: torch.Tensor, config: DPPConfig, generator: torch.Generator | None = None
                   ) -> torch.Tensor:
    """The logits' start from each unit's magnitude ``scores`` (groups along the last dimension):
    ``init_scale * log(1 + s / mean s)``, or ``init_scale * N(0, 1)`` with ``logit_init=normal``."""
    if config.logit_init is LogitInit.NORMAL:
        return config.init_scale * torch.randn(scores.shape, generator=generator)
    return config.init_scale * (scores / scores.mean(-1, keepdim=True).clamp_min(1e-12)).log1p()


class KOfNMask(nn.Module):
    """A ``torch.nn.utils.parametrize`` parametrization: ``weight * mask`` with a learned k-of-n mask."""

    def __init__(self, weight: torch.Tensor, config: DPPConfig, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.config = config
        self.groups, self.n = group_layout(weight.shape, config)
        self.k = config.k
        self.shape = tuple(weight.shape)
        self.temperature, self.noise_scale = config.temperature_at(0), config.noise_at(0)
        self.generator = generator
        self.logits = nn.Parameter(initial_logits(self._group_view(weight.detach().abs()), config, generator))

    def _group_view(self, w: torch.Tensor) -> torch.Tensor:
        g = self.config.pattern
        if g is Pattern.FILTER:
            return w.reshape(self.shape[0], -1).pow(2).sum(1).sqrt().reshape(1, -1)
        if g is Pattern.KERNEL:
            return w.reshape(self.shape[0], self.shape[1], -1).pow(2).sum(-1).sqrt()
        return w.reshape(self.groups, self.n)

    def _expand(self, mask: torch.Tensor) -> torch.Tensor:
        g = self.config.pattern
        if g is Pattern.FILTER:
            return mask.reshape(self.shape[0], *([1] * (len(self.shape) - 1))).expand(self.shape)
        if g is Pattern.KERNEL:
            return mask.reshape(self.shape[0], self.shape[1], 1, 1).expand(self.shape)
        return mask.reshape(self.shape)

    def mask(self) -> torch.Tensor:
        if self.training:
            m = gumbel_topk_mask(self.logits, self.k, self.temperature, self.noise_scale, self.generator)
        else:
            m = topk_mask(self.logits.detach(), self.k)
        return self._expand(m)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask()

    def entropy(self) -> torch.Tensor:
        p = torch.softmax(self.logits, -1)
        return -(p * p.clamp_min(1e-12).log()).sum(-1).mean()


def _fits(shape: torch.Size, config: DPPConfig) -> bool:
    try:
        group_layout(shape, config)
    except ValueError:
        return False
    return True


class STEQuantize(nn.Module):
    """Weight quantization trained with a straight-through estimator (a parametrization).

    ``bits=b``: ``q * clamp(round(w / q), -M, M)`` with ``M = 2^(b-1) - 1`` and ``q = max|w| / M`` (zero allowed, so
    masked weights stay zero); the gradient passes straight through. ``binary``: ``mean|w| * sign(w)`` with the
    hard-tanh surrogate gradient (``1`` where ``|w| <= 1``, else ``0``).
    """

    def __init__(self, bits: int | None = None, binary: bool = False) -> None:
        super().__init__()
        if binary == (bits is not None):
            raise ValueError("give exactly one of bits=N or binary=True")
        if bits is not None and bits < 2:
            raise ValueError(f"bits must be >= 2 for k-bit STE quantization (use binary for 1 bit), got {bits}")
        self.bits, self.binary = bits, binary

    def scale(self, w: torch.Tensor) -> float:
        """The step ``q`` this quantizer puts ``w`` on (its stored values are integer multiples of it)."""
        w = w.detach()
        if self.binary:
            nonzero = w != 0
            return float(w.abs()[nonzero].mean()) if nonzero.any() else 1.0
        return float(w.abs().max().clamp_min(1e-12) / (2 ** (self.bits - 1) - 1))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.binary:
            clamped = w.clamp(-1, 1)
            nonzero = w != 0
            scale = w.detach().abs()[nonzero].mean() if nonzero.any() else w.new_tensor(1.0)
            return (scale * torch.sign(w)).detach() + (clamped - clamped.detach())  # exact levels forward
        m = 2 ** (self.bits - 1) - 1
        q = w.detach().abs().max().clamp_min(1e-12) / m
        return (q * torch.clamp(torch.round(w / q), -m, m)).detach() + (w - w.detach())


def ste_quantizer(quant: QuantConstraint | str) -> STEQuantize | None:
    """The :class:`STEQuantize` for ``none`` (``None``), ``binary`` or ``bits=N`` (2 <= N <= 16), parsed by
    :meth:`~prunekit.planning.constraints.QuantConstraint.parse` like ADMM's.

    Raises:
        ValueError: anything else (ternary, bits=1, bits above 16, malformed text).
    """
    accepted = "none, binary or bits=N with 2 <= N <= 16"
    try:
        parsed = quant if isinstance(quant, QuantConstraint) else QuantConstraint.parse(quant)
    except ValueError as exc:
        raise ValueError(f"DPP quantization must be {accepted}, got {quant!r} ({exc})") from None
    if parsed.kind is QuantKind.NONE:
        return None
    if parsed.kind is QuantKind.BINARY:
        return STEQuantize(binary=True)
    if parsed.kind is QuantKind.BITS and parsed.bits >= 2:
        return STEQuantize(bits=parsed.bits)
    raise ValueError(f"DPP quantization must be {accepted}, got {str(quant)!r}")


def constrain_(module: nn.Module, mask: nn.Module, quant: QuantConstraint) -> STEQuantize | None:
    """Parametrize ``module.weight`` as ``Q(weight * mask)``: the mask first, then the quantizer, so the levels are
    those of the kept weights (the authors' order; a quantizer before the mask would average the removed weights
    into the binary level). Returns the quantizer (``None`` without quantization)."""
    from torch.nn.utils import parametrize

    parametrize.register_parametrization(module, "weight", mask)
    quantizer = ste_quantizer(quant)
    if quantizer is not None:
        parametrize.register_parametrization(module, "weight", quantizer)
    return quantizer


class DPPHooks(TrainHooks):
    """Sets each epoch's temperature and noise scale, adds the entropy regulariser, records per-layer
    confidence/diversity in the training history (so a resumed run keeps them).

    ``masks`` needs ``logits``, settable ``temperature`` and ``noise_scale``, and ``entropy()`` (:class:`KOfNMask`,
    :class:`prunekit.methods.dpp_filters.GroupMask`)."""

    def __init__(self, masks: dict[str, KOfNMask], config: DPPConfig) -> None:
        self.masks, self.config = masks, config
        self.adam = torch.optim.Adam([m.logits for m in masks.values()], lr=config.logit_lr_scale) \
            if config.logit_optimizer is LogitOptimizer.ADAM else None
        self.before_epoch(None, 0)

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        if self.adam is not None:  # the logits' own Adam, at logit_lr_scale x the weights' scheduled rate
            for group in self.adam.param_groups:
                group["lr"] = optimizer.param_groups[0]["lr"] * self.config.logit_lr_scale
            self.adam.step()
            self.adam.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        return {"adam": self.adam.state_dict()} if self.adam is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.adam is not None:
            if "adam" not in state:
                raise ValueError("the saved training has no Adam state for the logits (started with SGD logits?)")
            self.adam.load_state_dict(state["adam"])

    def before_epoch(self, model: nn.Module | None, epoch: int) -> None:
        for m in self.masks.values():
            m.temperature, m.noise_scale = self.config.temperature_at(epoch), self.config.noise_at(epoch)

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        logits = [m.logits for m in self.masks.values()]
        ids = {id(p) for p in logits}
        rest = [p for p in model.parameters() if id(p) not in ids]
        if self.adam is not None:  # the logits learn by their own optimizer only
            return [{"params": rest}]
        return [{"params": rest}, {"params": logits, "lr_scale": self.config.logit_lr_scale, "weight_decay": 0.0}]

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        if not self.config.entropy_weight:
            return None
        return self.config.entropy_weight * sum(m.entropy() for m in self.masks.values()) / len(self.masks)

    def epoch_metrics(self, model: nn.Module, epoch: int) -> dict[str, float]:
        return {"temperature": self.config.temperature_at(epoch), "noise_scale": self.config.noise_at(epoch),
                **{f"{n}/confidence": mask_confidence(m.logits) for n, m in self.masks.items()},
                **{f"{n}/diversity": mask_diversity(m.logits) for n, m in self.masks.items()}}


MASK_METRICS = ("epoch", "temperature", "noise_scale")


def mask_metrics(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The per-epoch mask metrics (epoch, temperature, noise scale, per-layer confidence and diversity) that
    :class:`DPPHooks` added to a training history."""
    return [{k: v for k, v in row.items() if k in MASK_METRICS or k.endswith(("/confidence", "/diversity"))}
            for row in history]


@dataclass
class DPPResult:
    """Final masks (float 0/1, weight-shaped) per layer and the per-epoch metrics."""

    masks: dict[str, torch.Tensor]
    metrics: list[dict[str, Any]]
    history: list[dict[str, Any]]
    scales: dict[str, float] = field(default_factory=dict)  # quantization step per layer (quantized runs)


def dpp_layers(model: nn.Module, config: DPPConfig, example: torch.Tensor) -> list[str]:
    """The Linear/Conv2d layers ``config``'s pattern fits (kernel groups need convolutions with more than k input
    channels, k-of-n runs need n to divide the rows; with the filter pattern the output layer is left alone),
    minus ignored ones."""
    from prunekit.channels.graph import find_output_layers, ignored_modules

    modules = dict(model.named_modules())
    skip = ignored_modules(model, list(config.ignore))
    if config.pattern is Pattern.FILTER:
        skip |= set(find_output_layers(model, example))
    return [n for n, m in modules.items() if isinstance(m, (nn.Linear, nn.Conv2d)) and n not in skip
            and getattr(m, "groups", 1) == 1 and _fits(m.weight.shape, config)]


def dpp_prune_(model: nn.Module, data, config: DPPConfig, train, layers: list[str] | None = None,
               progress: bool = True, per_layer: dict[str, DPPConfig] | None = None, out_dir: Path | None = None,
               resume: bool = False, log: Callable[[str], None] | None = None) -> DPPResult:
    """Learn k-of-n masks (and, with ``config.quant``, quantized weights) jointly with the weights for
    ``config.epochs`` epochs, in place.

    Args:
        train: Optimiser settings (its epochs are ``config.epochs``).
        layers: Linear/Conv2d layers to constrain (default: :func:`dpp_layers`).
        per_layer: Configs for individual layers (e.g. another ``n`` where ``config.n`` does not divide a row);
            the temperature schedule and entropy weight of ``config`` apply to all.
        out_dir, resume: Commit every epoch there (masks' logits included) and continue a committed run.

    Afterwards the weights hold ``weight * mask`` (evaluation mask) as plain parameters: no parametrization stays.
    """
    from torch.nn.utils import parametrize

    from prunekit.training import fit

    modules = dict(model.named_modules())
    if layers is None:
        layers = dpp_layers(model, config, data.train[:2][0])
    if not layers:
        raise ValueError(f"DPP found no Linear/Conv2d layer that the {config.pattern.value} pattern with "
                         f"k={config.k}, n={config.n} fits (kernel groups need convolutions with more than k "
                         "input channels; k-of-n runs need n to divide the rows)")
    masks: dict[str, KOfNMask] = {}
    quantizers: dict[str, STEQuantize] = {}
    for name in layers:
        module = modules[name]
        masks[name] = KOfNMask(module.weight, (per_layer or {}).get(name, config))
        quantizer = constrain_(module, masks[name], config.quant)
        if quantizer is not None:
            quantizers[name] = quantizer
    hooks = DPPHooks(masks, config)
    resume = resume and out_dir is not None and (Path(out_dir) / "train_state.pt").is_file()
    result = fit(model, data, replace(train, epochs=config.epochs), out_dir, progress=progress, hooks=hooks,
                 resume=resume, log=log)
    model.eval()
    final, scales = {}, {}
    for name in layers:
        final[name] = masks[name].mask().detach().clone()
        if name in quantizers:
            latent = modules[name].parametrizations.weight.original
            scales[name] = quantizers[name].scale(latent * final[name])
        parametrize.remove_parametrizations(modules[name], "weight", leave_parametrized=True)
    return DPPResult(final, mask_metrics(result.history), result.history, scales)


def dpp_(model: nn.Module, data, config: DPPConfig, ctx: RunContext) -> PruneRecord:
    """DPP on ``model`` in place (the ``apply`` of the ``dpp`` method): masks and weights trained together, then
    the evaluation masks applied (k-of-n, kernel, filter patterns) or the dropped filters removed physically
    (group pattern). Training is committed every epoch in the context's folder, so a resumed run loses at most
    one epoch."""
    from prunekit.measurement.plots import plot_mask_metrics

    train = replace(ctx.train, seed=ctx.seed)
    torch.manual_seed(ctx.seed)
    commit = ctx.subfolder("training")
    record = PruneRecord(method=config.method)
    if config.pattern is Pattern.GROUP:
        from prunekit.methods.dpp_filters import dpp_filter_prune_

        result = dpp_filter_prune_(model, data, config.target, config, train, ignore=config.ignore,
                                   progress=ctx.progress, out_dir=commit, resume=ctx.resume, log=ctx.log)
        change = result.plan.to_dict()
        if config.ignore:
            change["ignore"] = list(config.ignore)
        record.changes = [change]
        record.notes.append("filters kept per coupled group (k of n): " + ", ".join(
            f"{r} {k_}/{n_}" for r, (k_, n_) in result.kept.items()) + "; the rest were removed physically")
        ctx.log(f"removed {result.plan.num_removed()} coupled channels physically")
        layers = list(result.kept)
    else:
        per_layer, layer_names = None, None
        if config.target is not None:
            from prunekit.channels.graph import ignored_modules

            skip = ignored_modules(model, list(config.ignore))
            shapes = {name: m.weight.shape for name, m in model.named_modules()
                      if isinstance(m, (nn.Linear, nn.Conv2d)) and getattr(m, "groups", 1) == 1 and name not in skip}
            costs = weight_costs(model, shapes, tuple(data.train[:1][0].shape[1:])) \
                if config.target.metric is TargetMetric.FLOPS else None
            planned = plan_k_of_n(shapes, 1 - config.target.keep, costs=costs)
            per_layer = {name: replace(config, k=k_, n=n_, target=None) for name, (k_, n_) in planned.items()}
            layer_names = list(planned)
            ctx.log("k of n per layer: " + ", ".join(f"{name} {k_}/{n_}" for name, (k_, n_) in planned.items()))
            record.notes.append("k of n per layer (layers under 2% of the weights stay dense): " + ", ".join(
                f"{name} {k_}/{n_}" for name, (k_, n_) in planned.items()))
        base = replace(config, k=per_layer[layer_names[0]].k, n=per_layer[layer_names[0]].n, target=None) \
            if per_layer else config
        result = dpp_prune_(model, data, base, train, layers=layer_names, progress=ctx.progress,
                            per_layer=per_layer, out_dir=commit, resume=ctx.resume, log=ctx.log)
        layers = list(result.masks)
        record.encoding = {"quant": str(config.quant), "masked_layers": layers, "scales": result.scales}
        if config.pattern is Pattern.K_OF_N and not config.tiles:
            record.encoding["k_of_n"] = {name: [per_layer[name].k, per_layer[name].n] if per_layer else
                                         [config.k, config.n] for name in layers}
    last = result.metrics[-1] if result.metrics else {}
    record.rounds = result.history
    record.results = {"metrics": result.metrics}
    if config.pattern is Pattern.GROUP:
        record.results["kept"] = {root: list(kn) for root, kn in result.kept.items()}  # group -> (k, n) filters
    t = config.temperature
    record.notes.insert(0, f"{config.epochs} epoch(s) of joint mask + weight training, temperature {t.start:g} -> "
                           f"{t.end:g} ({t.mode.value}, per epoch), logits from {config.logit_init.value} "
                           f"x{config.init_scale:g} trained by {config.logit_optimizer.value} at "
                           f"{config.logit_lr_scale:g} x lr; model chosen on validation")
    record.notes.append("final mask confidence / diversity per layer: " + ", ".join(
        f"{name} {last.get(name + '/confidence', float('nan')):.2f} / {last.get(name + '/diversity', float('nan')):.2f}"
        for name in layers))
    record.figures["mask_metrics.png"] = lambda path: plot_mask_metrics(result.metrics, path, title=config.label())
    return record


register(MethodSpec("dpp", DPPConfig, dpp_,
                    "Gonzalez-Carabarin et al. 2021, Dynamic Probabilistic Pruning, arXiv 2105.12686",
                    "learned exactly-k-of-n masks (weights, kernels, filters) by Gumbel-softmax, optionally quantized",
                    lr=0.01, warmup=0.0))  # the rate benchmarks/dpp.py tuned the logits' rate against
