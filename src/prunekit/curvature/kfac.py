"""Curvature statistics: Kronecker-factored (K-FAC) and diagonal Fisher of Linear and Conv2d layers.

K-FAC (Martens & Grosse 2015, arXiv 1503.05671; convolutions: Grosse & Martens 2016, arXiv 1602.01407) approximates
the Fisher block of a layer with weight matrix ``W`` (``out x in``; a conv's kernel flattened to ``out x C_in*kh*kw``,
the bias appended as one more input column fed by a constant 1) by ``G kron A`` with

* ``A = E[a a^T]`` over layer inputs: every example (Linear), every output position's im2col patch
  (:attr:`ConvFactor.PATCHES`), or every (position, kernel offset) pair as a sample of length ``C_in``
  (:attr:`ConvFactor.CHANNEL`: ``A`` is ``C_in x C_in``, the form EigenDamage rotates with);
* ``G = E_n[sum_t g_nt g_nt^T]``: pre-activation gradients of one example's own loss (the mean-reduced batch loss
  is undone by multiplying by the batch size), summed over that example's positions ``t`` (KFC's convention, so
  that ``A kron G`` carries the factor ``T`` of a conv's ``T`` positions; for a Linear layer ``T = 1``).

A module called several times per forward counts each call as more positions. The true Fisher (labels sampled
from the model's predictive distribution) is the default; the empirical Fisher uses the data labels. BatchNorm
runs in eval mode while statistics are collected, so they describe the network that will be pruned.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from prunekit.channels.model_io import call_model, to_device
from prunekit.configs import Config, coerce_fields, config_from_dict


class FisherType(str, enum.Enum):
    """Which labels the gradients are taken for."""

    TRUE = "true"  # sampled from the model's own predictive distribution
    EMPIRICAL = "empirical"  # the data labels


class ConvFactor(str, enum.Enum):
    """How a convolution's input factor is formed."""

    PATCHES = "patches"  # A over full im2col patches: (C_in*kh*kw [+1]) square
    CHANNEL = "channel"  # each kernel offset a sample of length C_in: C_in square


class DampingMode(str, enum.Enum):
    """How Tikhonov damping ``gamma`` is split between the factors (Martens & Grosse 2015, section 6.3)."""

    PI = "pi"  # A + pi*sqrt(gamma) I, G + sqrt(gamma)/pi I, pi = sqrt((tr A / dim A) / (tr G / dim G))
    PLAIN = "plain"  # A + sqrt(gamma) I, G + sqrt(gamma) I


@dataclass(frozen=True)
class CurvatureConfig:
    """How curvature statistics are collected and damped.

    Args:
        fisher: True Fisher (labels sampled from the model, the default) or empirical Fisher (data labels).
        batches: Training batches the running averages cover.
        conv_factor: Input factor of convolutions for the OBD/OBS criteria (EigenDamage always uses
            :attr:`ConvFactor.CHANNEL`).
        damping: Tikhonov damping ``gamma`` added to the factor product, relative to the mean eigenvalue of each
            factor (``gamma * mean(eig)``), so one value suits layers of very different scale. The default 0.1 is
            Kron-OBS's best on validation in ``benchmarks/damping.py`` (ResNet-20, Fashion-MNIST, x4 FLOPs).
        damping_mode: Split of the damping between the factors.
        obs_update: Weight compensation of the OBS criteria after removal: ``"individual"`` (sum of the
            per-channel OBS updates), ``"joint"`` (the exact update for all removed channels of a layer at once)
            or ``"none"``.
        seed: Seed of the label sampling of the true Fisher.
    """

    fisher: FisherType = FisherType.TRUE
    batches: int = 8
    conv_factor: ConvFactor = ConvFactor.PATCHES
    damping: float = 0.1
    damping_mode: DampingMode = DampingMode.PI
    obs_update: str = "individual"
    seed: int = 0

    def __post_init__(self) -> None:
        for name, kind in (("fisher", FisherType), ("conv_factor", ConvFactor), ("damping_mode", DampingMode)):
            value = getattr(self, name)
            try:
                object.__setattr__(self, name, kind(value))
            except ValueError:
                raise ValueError(f"{name} must be one of {[k.value for k in kind]}, got {value!r}") from None
        if isinstance(self.batches, bool) or not isinstance(self.batches, int) or self.batches < 1:
            raise ValueError(f"curvature batches must be an int >= 1, got {self.batches!r}")
        if not (isinstance(self.damping, (int, float)) and math.isfinite(self.damping) and self.damping >= 0):
            raise ValueError(f"damping must be a finite number >= 0, got {self.damping!r}")
        if self.obs_update not in ("individual", "joint", "none"):
            raise ValueError(f"obs_update must be 'individual', 'joint' or 'none', got {self.obs_update!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"fisher": self.fisher.value, "batches": self.batches, "conv_factor": self.conv_factor.value,
                "damping": self.damping, "damping_mode": self.damping_mode.value, "obs_update": self.obs_update,
                "seed": self.seed}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CurvatureConfig:
        return config_from_dict(cls, data)


class ObsUpdate(str, enum.Enum):
    """Weight compensation of the OBS criteria after removal."""

    INDIVIDUAL = "individual"  # the sum of the per-channel OBS updates
    JOINT = "joint"  # the exact update for all removed channels of a layer at once
    NONE = "none"


@dataclass(frozen=True)
class FisherSettings(Config):
    """The curvature settings a method exposes (the rest of :class:`CurvatureConfig` follows from the method).

    Args:
        fisher: True Fisher (labels sampled from the model) or empirical Fisher (data labels).
        fisher_batches: Training batches of 64 the statistics average over (64: the kept eigen-ranks move by 1.2% of
            a layer's width between independent samples, against 1.9% with 8, at 0.2 of an epoch per round;
            ``benchmarks/fisher_samples.py``).
        damping: Tikhonov damping, relative to the factors' mean eigenvalues (0.1: Kron-OBS's best on validation
            in ``benchmarks/damping.py``).
        damping_mode: Split of the damping between the factors (``pi`` or ``plain``).
    """

    fisher: FisherType = FisherType.TRUE
    fisher_batches: int = 64
    damping: float = 0.1
    damping_mode: DampingMode = DampingMode.PI

    def __post_init__(self) -> None:
        coerce_fields(self)
        if not (math.isfinite(self.damping) and self.damping > 0):
            raise ValueError(f"damping must be a finite number > 0 (the factors are inverted; 0.1 is the default, "
                             f"1e-3 a light touch), got {self.damping!r}")
        self.curvature(0)  # validates

    def curvature(self, seed: int, conv_factor: ConvFactor = ConvFactor.PATCHES,
                  obs_update: ObsUpdate = ObsUpdate.INDIVIDUAL) -> CurvatureConfig:
        """The full :class:`CurvatureConfig` with the label-sampling ``seed`` and the method's own choices."""
        return CurvatureConfig(fisher=self.fisher, batches=self.fisher_batches, conv_factor=conv_factor,
                               damping=self.damping, damping_mode=self.damping_mode,
                               obs_update=ObsUpdate(obs_update).value, seed=seed)


class CurvatureError(ValueError):
    """Statistics that cannot be used (NaN/inf, no data); the message names the layer."""


def kfac_support(module: nn.Module) -> str | None:
    """``None`` when K-FAC statistics can be collected for ``module``, else the reason they cannot."""
    if isinstance(module, nn.Linear):
        return None
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return f"grouped convolution (groups={module.groups}) has no Kronecker-factored form here"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r} is not supported (only 'zeros')"
        if isinstance(module.padding, str):
            return f"padding={module.padding!r} is not supported; give explicit padding sizes"
        return None
    return f"{type(module).__name__} is not a Linear or Conv2d layer"


@dataclass
class KroneckerFactors:
    """``A`` (input) and ``G`` (output-gradient) factors of one layer, float64 on CPU.

    ``weight_matrix`` gives the layer's weights in the layout the factors describe: ``out x in`` with conv kernels
    flattened as ``(C_in, kh, kw)`` (PATCHES) and the bias as the last column when ``has_bias``; for CHANNEL
    factors a conv weight is ``out x C_in x kh*kw``.
    """

    A: torch.Tensor
    G: torch.Tensor
    has_bias: bool
    conv_factor: ConvFactor | None  # None for Linear
    kernel_numel: int = 1

    def weight_matrix(self, module: nn.Module) -> torch.Tensor:
        w = module.weight.detach().double().cpu()
        if self.conv_factor is ConvFactor.CHANNEL:
            return w.reshape(w.shape[0], w.shape[1], -1)
        w = w.reshape(w.shape[0], -1)
        if self.has_bias:
            w = torch.cat([w, module.bias.detach().double().cpu()[:, None]], 1)
        return w

    def damped(self, damping: float, mode: DampingMode = DampingMode.PI) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A + d_A I, G + d_G I)`` with ``d_A * d_G`` about ``damping * mean_eig(A) * mean_eig(G)``."""
        mean_a = float(self.A.diagonal().mean().clamp_min(1e-30))
        mean_g = float(self.G.diagonal().mean().clamp_min(1e-30))
        root = math.sqrt(damping)
        if mode is DampingMode.PI:
            d_a, d_g = root * mean_a, root * mean_g
        else:
            scale = math.sqrt(mean_a * mean_g)
            d_a = d_g = root * scale
        eye_a = torch.eye(len(self.A), dtype=self.A.dtype)
        eye_g = torch.eye(len(self.G), dtype=self.G.dtype)
        return self.A + d_a * eye_a, self.G + d_g * eye_g

    def eigh(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(lambda_A, Q_A, lambda_G, Q_G)``, float64, eigenvalues clamped at 0 (ascending order)."""
        la, qa = torch.linalg.eigh(self.A)
        lg, qg = torch.linalg.eigh(self.G)
        return la.clamp_min(0), qa, lg.clamp_min(0), qg


@dataclass
class _Accumulator:
    a_sum: torch.Tensor | None = None
    a_count: int = 0
    g_sum: torch.Tensor | None = None
    per_example: torch.Tensor | None = None  # diagonal Fisher: this batch's per-example gradients, summed over calls
    diag_sum: torch.Tensor | None = None
    inputs: list[torch.Tensor] = field(default_factory=list)


def _patches(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Layer inputs as ``(N, positions, features)``: im2col patches for a conv, token rows for a Linear."""
    if isinstance(module, nn.Conv2d):
        cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding,
                        stride=module.stride)  # (N, C*kh*kw, L)
        return cols.transpose(1, 2)
    return x.reshape(x.shape[0], -1, x.shape[-1])


def _grad_rows(module: nn.Module, g: torch.Tensor) -> torch.Tensor:
    """Pre-activation gradients as ``(N, positions, out)``."""
    if isinstance(module, nn.Conv2d):
        return g.flatten(2).transpose(1, 2)
    return g.reshape(g.shape[0], -1, g.shape[-1])


class _Hooks:
    """Forward hooks on the chosen layers that attach a gradient hook to each output; removed on exit."""

    def __init__(self, model: nn.Module, layers: dict[str, nn.Module], conv_factor: ConvFactor,
                 kfac: bool, diagonal: bool) -> None:
        self.layers = layers
        self.conv_factor = conv_factor
        self.kfac, self.diagonal = kfac, diagonal
        self.acc = {name: _Accumulator() for name in layers}
        self.batch_size = 1
        self.handles = [m.register_forward_hook(self._forward(name)) for name, m in layers.items()]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def _forward(self, name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if not torch.is_grad_enabled() or not output.requires_grad:
                return
            x = args[0].detach()
            acc = self.acc[name]
            a = _patches(module, x)
            if module.bias is not None and not (self.conv_factor is ConvFactor.CHANNEL
                                                and isinstance(module, nn.Conv2d)):
                a = torch.cat([a, a.new_ones(*a.shape[:2], 1)], 2)
            if self.kfac:
                if isinstance(module, nn.Conv2d) and self.conv_factor is ConvFactor.CHANNEL:
                    k = module.kernel_size[0] * module.kernel_size[1]
                    rows = a.reshape(-1, module.in_channels, k).transpose(1, 2).reshape(-1, module.in_channels)
                else:
                    rows = a.reshape(-1, a.shape[-1])
                outer = (rows.T @ rows).double().cpu()
                acc.a_sum = outer if acc.a_sum is None else acc.a_sum + outer
                acc.a_count += rows.shape[0]
            if self.diagonal:
                acc.inputs.append(a)
            output.register_hook(self._backward(name, module, len(acc.inputs) - 1))

        return hook

    def _backward(self, name: str, module: nn.Module, call: int):
        def hook(grad: torch.Tensor) -> None:
            acc = self.acc[name]
            g = _grad_rows(module, grad.detach()) * self.batch_size  # one example's own loss gradient
            if self.kfac:
                rows = g.reshape(-1, g.shape[-1])
                outer = (rows.T @ rows).double().cpu()
                acc.g_sum = outer if acc.g_sum is None else acc.g_sum + outer
            if self.diagonal:
                per_example = torch.einsum("nto,ntk->nok", g, acc.inputs[call])
                acc.per_example = per_example if acc.per_example is None else acc.per_example + per_example

        return hook

    def end_batch(self) -> None:
        for acc in self.acc.values():
            if acc.per_example is not None:
                d = acc.per_example.pow(2).sum(0).double().cpu()
                acc.diag_sum = d if acc.diag_sum is None else acc.diag_sum + d
            acc.per_example = None
            acc.inputs = []


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        backend_device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
            else torch.device("cpu")
        moved = t.to(backend_device)
        dist.all_reduce(moved)
        return moved.to(t.device)
    return t


def _supported_layers(model: nn.Module, layers: Iterable[str] | None) -> dict[str, nn.Module]:
    modules = dict(model.named_modules())
    if layers is None:
        return {n: m for n, m in modules.items() if kfac_support(m) is None}
    chosen = {}
    for name in layers:
        if name not in modules:
            raise ValueError(f"no layer named {name!r} in the model")
        reason = kfac_support(modules[name])
        if reason is not None:
            raise ValueError(f"cannot collect curvature for {name}: {reason}. Supported: nn.Linear and nn.Conv2d "
                             "(groups=1, zero padding); leave the layer out or exclude it with ignore=[...]")
        chosen[name] = modules[name]
    return chosen


@contextmanager
def _collecting(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)


def _run(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], hooks: _Hooks,
         config: CurvatureConfig, progress: bool) -> int:
    """Forward/backward over ``batches``; returns the number of examples seen (summed over processes)."""
    device = next(model.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(config.seed)
    seen = 0
    with _collecting(model):
        for x, y in tqdm(batches, total=config.batches, desc="curvature", disable=not progress, leave=False):
            x, y = to_device(x, device), y.to(device)
            model.zero_grad(set_to_none=True)
            logits = call_model(model, x)
            if logits.ndim != 2:
                raise CurvatureError("curvature needs (batch, classes) logits, the model returned "
                                     f"{tuple(logits.shape)}")
            if config.fisher is FisherType.TRUE:
                probs = torch.softmax(logits.detach().double().cpu(), 1)
                y = torch.multinomial(probs, 1, generator=generator).squeeze(1).to(device)
            hooks.batch_size = logits.shape[0]
            F.cross_entropy(logits, y).backward()
            hooks.end_batch()
            seen += logits.shape[0]
    hooks.remove()
    total = int(_all_reduce(torch.tensor([seen], dtype=torch.float64)).item())
    if total == 0:
        raise CurvatureError("curvature statistics need at least one batch of data")
    return total


def _check_finite(name: str, what: str, t: torch.Tensor) -> torch.Tensor:
    if not torch.isfinite(t).all():
        raise CurvatureError(f"{what} of layer {name} has NaN/inf entries; check the model's weights and inputs "
                             "(a diverged checkpoint gives non-finite gradients)")
    return t


def collect_kfac(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                 config: CurvatureConfig = CurvatureConfig(), layers: Iterable[str] | None = None, *,
                 conv_factor: ConvFactor | None = None, progress: bool = False) -> dict[str, KroneckerFactors]:
    """K-FAC factors of ``layers`` (default: every supported Linear/Conv2d) averaged over ``batches``.

    Under torch.distributed the sums are all-reduced, so every process gets the factors of all processes' data.

    Raises:
        ValueError: a named layer is missing or unsupported.
        CurvatureError: no data, or non-finite statistics (names the layer).
    """
    form = ConvFactor(conv_factor or config.conv_factor)
    chosen = _supported_layers(model, layers)
    hooks = _Hooks(model, chosen, form, kfac=True, diagonal=False)
    try:
        examples = _run(model, batches, hooks, config, progress)
    finally:
        hooks.remove()
    factors = {}
    for name, module in chosen.items():
        acc = hooks.acc[name]
        if acc.a_sum is None or acc.g_sum is None:
            continue  # the layer was not on the path from input to loss
        a_sum = _all_reduce(acc.a_sum)
        count = _all_reduce(torch.tensor([float(acc.a_count)], dtype=torch.float64)).item()
        A = _check_finite(name, "the input factor A", a_sum / count)
        G = _check_finite(name, "the gradient factor G", _all_reduce(acc.g_sum) / examples)
        is_conv = isinstance(module, nn.Conv2d)
        factors[name] = KroneckerFactors(
            A=A, G=G, has_bias=module.bias is not None and not (is_conv and form is ConvFactor.CHANNEL),
            conv_factor=form if is_conv else None,
            kernel_numel=module.kernel_size[0] * module.kernel_size[1] if is_conv else 1)
    return factors


def collect_diagonal_fisher(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                            config: CurvatureConfig = CurvatureConfig(), layers: Iterable[str] | None = None, *,
                            progress: bool = False) -> dict[str, torch.Tensor]:
    """Diagonal Fisher ``E_n[(dL_n/dW)^2]`` of each layer's weight matrix (``out x in``, bias as the last column,
    conv kernels flattened), from exact per-example gradients (float64 on CPU)."""
    chosen = _supported_layers(model, layers)
    hooks = _Hooks(model, chosen, ConvFactor.PATCHES, kfac=False, diagonal=True)
    try:
        examples = _run(model, batches, hooks, config, progress)
    finally:
        hooks.remove()
    return {name: _check_finite(name, "the diagonal Fisher", _all_reduce(hooks.acc[name].diag_sum) / examples)
            for name in chosen if hooks.acc[name].diag_sum is not None}
