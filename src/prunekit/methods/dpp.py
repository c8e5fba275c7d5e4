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
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from prunekit.configs import config_from_dict
from prunekit.training import TrainHooks


class Granularity(str, enum.Enum):
    """What one k-of-n group is."""

    WEIGHT = "weight"  # n consecutive input weights of an output neuron (Linear rows, conv rows flattened)
    KERNEL = "kernel"  # the C_in kernels of an output filter (n = C_in)
    FILTER = "filter"  # the filters of a layer (n = out_channels)


class Schedule(str, enum.Enum):
    LINEAR = "linear"
    EXPONENTIAL = "exponential"


@dataclass(frozen=True)
class TemperatureSchedule:
    """``T(epoch)`` from ``start`` towards ``end`` over ``epochs`` (linear, or exponential decay), never below
    ``floor``; indexed by epoch, not step, so resuming an epoch gives the same temperature."""

    start: float = 1.0
    end: float = 0.05
    epochs: int = 10
    mode: Schedule = Schedule.EXPONENTIAL
    floor: float = 0.01

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", Schedule(self.mode))
        for name in ("start", "end", "floor"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
                raise ValueError(f"temperature {name} must be > 0, got {v!r}")
        if self.epochs < 1:
            raise ValueError(f"temperature schedule epochs must be >= 1, got {self.epochs!r}")

    def __call__(self, epoch: int) -> float:
        frac = min(max(epoch, 0) / max(self.epochs - 1, 1), 1.0)
        if self.mode is Schedule.LINEAR:
            t = self.start + (self.end - self.start) * frac
        else:
            t = self.start * (self.end / self.start) ** frac
        return max(t, self.floor)


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


@dataclass(frozen=True)
class DPPConfig:
    """DPP settings.

    Args:
        granularity: :class:`Granularity` of a group.
        k, n: Keep ``k`` of every ``n`` (for kernel and filter granularity ``n`` is the layer's own size and may be
            left ``None``).
        tiles: Weight granularity: split each row into this many tiles, ``k`` of ``n = row / tiles`` in each.
        temperature: :class:`TemperatureSchedule`.
        noise_scale: ``s`` in ``phi + s * Gumbel``.
        anneal_noise: Scale ``s`` with the temperature, ``s * T(epoch) / T(0)``, so the draws settle on
            ``top-k(phi)`` as the relaxation sharpens and the last epochs train the weights under (nearly) the mask
            that evaluation uses.
        entropy_weight: Weight of the mean logit entropy added to the loss (0: off).
        init_scale: Logits start at ``init_scale * |w|`` normalised per group (magnitude-informed start).
        logit_lr_scale: The logits' learning rate, as a multiple of the weights' (logits never get weight decay,
            which would only flatten them toward the uniform mask).
    """

    granularity: Granularity = Granularity.WEIGHT
    k: int = 1
    n: int | None = 4
    tiles: int | None = None
    temperature: TemperatureSchedule = TemperatureSchedule()
    noise_scale: float = 1.0
    entropy_weight: float = 0.0
    init_scale: float = 1.0
    anneal_noise: bool = False
    logit_lr_scale: float = 1.0

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "granularity", Granularity(self.granularity))
        except ValueError:
            raise ValueError(f"granularity must be one of {[g.value for g in Granularity]}, "
                             f"got {self.granularity!r}") from None
        if isinstance(self.temperature, dict):
            object.__setattr__(self, "temperature", TemperatureSchedule(**self.temperature))
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be an int >= 1, got {self.k!r}")
        if self.n is not None and self.k >= self.n:
            raise ValueError(f"k must be smaller than n (keep k of every n), got k={self.k}, n={self.n}")
        if self.tiles is not None and (self.tiles < 1 or self.granularity is not Granularity.WEIGHT):
            raise ValueError(f"tiles must be >= 1 and needs weight granularity, got tiles={self.tiles!r}")
        for name in ("noise_scale", "entropy_weight", "init_scale"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not (math.isfinite(self.logit_lr_scale) and self.logit_lr_scale > 0):
            raise ValueError(f"logit_lr_scale must be > 0 and finite, got {self.logit_lr_scale!r}")

    def to_dict(self) -> dict[str, Any]:
        t = self.temperature
        return {"granularity": self.granularity.value, "k": self.k, "n": self.n, "tiles": self.tiles,
                "temperature": {"start": t.start, "end": t.end, "epochs": t.epochs, "mode": t.mode.value,
                                "floor": t.floor},
                "noise_scale": self.noise_scale, "entropy_weight": self.entropy_weight, "init_scale": self.init_scale,
                "anneal_noise": self.anneal_noise, "logit_lr_scale": self.logit_lr_scale}

    def noise_at(self, epoch: int) -> float:
        """The Gumbel noise scale of ``epoch`` (0-based)."""
        if not self.anneal_noise:
            return self.noise_scale
        return self.noise_scale * self.temperature(epoch) / self.temperature(0)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DPPConfig:
        return config_from_dict(cls, data)


def group_layout(weight_shape: torch.Size | tuple[int, ...], config: DPPConfig) -> tuple[int, int]:
    """``(groups, n)`` of a weight under ``config``.

    Raises:
        ValueError: ``n`` does not divide the row, or ``k >= n`` for the layer's own ``n``.
    """
    out = weight_shape[0]
    row = math.prod(weight_shape[1:])
    g = config.granularity
    if g is Granularity.FILTER:
        n = out
        groups = 1
    elif g is Granularity.KERNEL:
        if len(weight_shape) != 4:
            raise ValueError(f"kernel granularity needs a Conv2d weight, got shape {tuple(weight_shape)}")
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


class KOfNMask(nn.Module):
    """A ``torch.nn.utils.parametrize`` parametrization: ``weight * mask`` with a learned k-of-n mask."""

    def __init__(self, weight: torch.Tensor, config: DPPConfig, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.config = config
        self.groups, self.n = group_layout(weight.shape, config)
        self.k = config.k
        self.shape = tuple(weight.shape)
        self.temperature, self.noise_scale = config.temperature(0), config.noise_at(0)
        self.generator = generator
        scores = self._group_view(weight.detach().abs())
        scores = scores / scores.mean(-1, keepdim=True).clamp_min(1e-12)
        self.logits = nn.Parameter(config.init_scale * scores.log1p())

    def _group_view(self, w: torch.Tensor) -> torch.Tensor:
        g = self.config.granularity
        if g is Granularity.FILTER:
            return w.reshape(self.shape[0], -1).pow(2).sum(1).sqrt().reshape(1, -1)
        if g is Granularity.KERNEL:
            return w.reshape(self.shape[0], self.shape[1], -1).pow(2).sum(-1).sqrt()
        return w.reshape(self.groups, self.n)

    def _expand(self, mask: torch.Tensor) -> torch.Tensor:
        g = self.config.granularity
        if g is Granularity.FILTER:
            return mask.reshape(self.shape[0], *([1] * (len(self.shape) - 1))).expand(self.shape)
        if g is Granularity.KERNEL:
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

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.binary:
            clamped = w.clamp(-1, 1)
            nonzero = w != 0
            scale = w.detach().abs()[nonzero].mean() if nonzero.any() else w.new_tensor(1.0)
            return (scale * torch.sign(w)).detach() + (clamped - clamped.detach())  # exact levels forward
        m = 2 ** (self.bits - 1) - 1
        q = w.detach().abs().max().clamp_min(1e-12) / m
        return (q * torch.clamp(torch.round(w / q), -m, m)).detach() + (w - w.detach())


def ste_quantizer(quant: str) -> STEQuantize | None:
    """The :class:`STEQuantize` for ``none`` (``None``), ``binary`` or ``bits=N`` (2 <= N <= 16), parsed by
    :meth:`~prunekit.planning.constraints.QuantConstraint.parse` like ADMM's.

    Raises:
        ValueError: anything else (ternary, bits=1, bits above 16, malformed text).
    """
    from prunekit.planning.constraints import QuantConstraint, QuantKind

    accepted = "none, binary or bits=N with 2 <= N <= 16"
    try:
        parsed = QuantConstraint.parse(quant)
    except ValueError as exc:
        raise ValueError(f"DPP quantization must be {accepted}, got {quant!r} ({exc})") from None
    if parsed.kind is QuantKind.NONE:
        return None
    if parsed.kind is QuantKind.BINARY:
        return STEQuantize(binary=True)
    if parsed.kind is QuantKind.BITS and parsed.bits >= 2:
        return STEQuantize(bits=parsed.bits)
    raise ValueError(f"DPP quantization must be {accepted}, got {quant!r}")


class DPPHooks(TrainHooks):
    """Sets each epoch's temperature and noise scale, adds the entropy regulariser, records per-layer
    confidence/diversity.

    ``masks`` needs ``logits``, settable ``temperature`` and ``noise_scale``, and ``entropy()`` (:class:`KOfNMask`,
    :class:`prunekit.methods.dpp_filters.GroupMask`)."""

    def __init__(self, masks: dict[str, KOfNMask], config: DPPConfig) -> None:
        self.masks, self.config = masks, config
        self.metrics: list[dict[str, Any]] = []
        self._set(0)

    def _set(self, epoch: int) -> None:
        for m in self.masks.values():
            m.temperature, m.noise_scale = self.config.temperature(epoch), self.config.noise_at(epoch)

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        logits = [m.logits for m in self.masks.values()]
        ids = {id(p) for p in logits}
        rest = [p for p in model.parameters() if id(p) not in ids]
        return [{"params": rest}, {"params": logits, "lr_scale": self.config.logit_lr_scale, "weight_decay": 0.0}]

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        if not self.config.entropy_weight:
            return None
        return self.config.entropy_weight * sum(m.entropy() for m in self.masks.values()) / len(self.masks)

    def after_epoch(self, model: nn.Module, epoch: int) -> None:
        self.metrics.append({"epoch": epoch + 1, "temperature": self.config.temperature(epoch),
                             "noise_scale": self.config.noise_at(epoch),
                             **{f"{n}/confidence": mask_confidence(m.logits) for n, m in self.masks.items()},
                             **{f"{n}/diversity": mask_diversity(m.logits) for n, m in self.masks.items()}})
        self._set(epoch + 1)


@dataclass
class DPPResult:
    """Final masks (float 0/1, weight-shaped) per layer and the per-epoch metrics."""

    masks: dict[str, torch.Tensor]
    metrics: list[dict[str, Any]]
    history: list[dict[str, Any]]


def dpp_prune_(model: nn.Module, data, config: DPPConfig, train, layers: list[str] | None = None,
               quant: str = "none", progress: bool = True,
               per_layer: dict[str, DPPConfig] | None = None) -> DPPResult:
    """Learn k-of-n masks (and, with ``quant``, quantized weights) jointly with the weights, in place.

    Args:
        layers: Linear/Conv2d layers to constrain (default: every layer the granularity fits, e.g. kernel
            granularity skips Linear layers and a first conv with fewer than k + 1 input channels; for filter
            granularity the output layer is left alone).
        quant: ``none``, ``binary`` or ``bits=N`` (N >= 2), trained with straight-through estimators.
        per_layer: Configs for individual layers (e.g. another ``n`` where ``config.n`` does not divide a row);
            the temperature schedule and entropy weight of ``config`` apply to all.

    Afterwards the weights hold ``weight * mask`` (evaluation mask) as plain parameters: no parametrization stays.
    """
    from torch.nn.utils import parametrize

    from prunekit.channels.graph import find_output_layers
    from prunekit.training import fit

    modules = dict(model.named_modules())
    if layers is None:
        skip = set(find_output_layers(model, data.train[:2][0])) if config.granularity is Granularity.FILTER \
            else set()
        layers = [n for n, m in modules.items() if isinstance(m, (nn.Linear, nn.Conv2d)) and n not in skip
                  and getattr(m, "groups", 1) == 1 and _fits(m.weight.shape, config)]
    if not layers:
        raise ValueError(f"DPP found no Linear/Conv2d layer that {config.granularity.value} granularity with "
                         f"k={config.k}, n={config.n} fits (kernel granularity needs convolutions with more than k "
                         "input channels; weight granularity needs n to divide the rows)")
    masks: dict[str, KOfNMask] = {}
    for name in layers:
        module = modules[name]
        mask = KOfNMask(module.weight, (per_layer or {}).get(name, config))
        quantizer = ste_quantizer(quant)
        if quantizer is not None:
            parametrize.register_parametrization(module, "weight", quantizer)
        parametrize.register_parametrization(module, "weight", mask)
        masks[name] = mask
    hooks = DPPHooks(masks, config)
    result = fit(model, data, train, progress=progress, hooks=hooks)
    model.eval()
    final = {}
    for name in layers:
        final[name] = masks[name].mask().detach().clone()
        parametrize.remove_parametrizations(modules[name], "weight", leave_parametrized=True)
    return DPPResult(final, hooks.metrics, result.history)


def nearest_k_of_n(row: int, k: int, n: int) -> tuple[int, int]:
    """The ``(k', n')`` closest to keeping ``k / n`` for a row of length ``row``: ``n'`` is the divisor of ``row``
    nearest to ``n`` (the larger one on a tie) and ``k' = max(1, round(k * n' / n))`` (``k' < n'``)."""
    divisors = [d for d in range(2, row + 1) if row % d == 0]
    if not divisors:
        raise ValueError(f"a row of length {row} cannot hold a k-of-n pattern")
    best = min(divisors, key=lambda d: (abs(d - n), -d))
    return min(max(1, round(k * best / n)), best - 1), best


def k_of_n_for_keep(row: int, keep: float, max_n: int = 32) -> tuple[int, int]:
    """The largest ``k / n <= keep`` with ``n`` dividing ``row`` and ``n <= max_n`` (hardware run lengths stay
    short; on a tie the shorter run wins), so the layer is never less sparse than asked; when even ``1 / n`` is
    above ``keep``, the sparsest ``1 / n`` there is."""
    if not 0 < keep < 1:
        raise ValueError(f"keep must be in (0, 1), got {keep!r}")
    candidates = [(k, n) for n in range(2, min(row, max_n) + 1) if row % n == 0 for k in range(1, n)]
    if not candidates:
        raise ValueError(f"a row of length {row} has no divisor in [2, {max_n}] for a k-of-n pattern")
    below = [kn for kn in candidates if kn[0] / kn[1] <= keep + 1e-12]
    if not below:
        return min(candidates, key=lambda kn: (kn[0] / kn[1], kn[1]))
    return max(below, key=lambda kn: (kn[0] / kn[1], -kn[1]))


def plan_k_of_n(weights: dict[str, torch.Size | tuple[int, ...]], sparsity: float, dense_below: float = 0.02,
                max_n: int = 32) -> dict[str, tuple[int, int]]:
    """Per-layer ``(k, n)`` reaching about ``sparsity`` of all the weights overall.

    Layers holding less than ``dense_below`` of the weights (a LeNet's first convolution and classifier: about 1%
    of its weights, where one kept weight in ten costs the most accuracy) stay dense and are left out of the
    result; the others share the remaining budget at one keep ratio, each with the densest k-of-n at or under it
    (:func:`k_of_n_for_keep`). Common practice for N:M sparsity, and it applies to any method alike.

    Raises:
        ValueError: ``sparsity`` is not in (0, 1), or the dense layers alone hold more than the budget.
    """
    if not 0 < sparsity < 1:
        raise ValueError(f"sparsity must be in (0, 1), got {sparsity!r}")
    sizes = {name: math.prod(shape) for name, shape in weights.items()}
    total = sum(sizes.values())
    pruned = {name for name, size in sizes.items() if size >= dense_below * total}
    dense = total - sum(sizes[name] for name in pruned)
    budget = (1 - sparsity) * total - dense
    if not pruned or budget <= 0:
        raise ValueError(f"the layers kept dense (under {dense_below:.0%} of the weights each) hold {dense} of "
                         f"{total} weights, more than {1 - sparsity:.1%} allows; lower dense_below")
    keep = budget / sum(sizes[name] for name in pruned)
    return {name: k_of_n_for_keep(math.prod(weights[name][1:]), keep, max_n) for name in weights if name in pruned}
