"""Training and evaluation: SGD with momentum, step or cosine learning rate, best-on-validation checkpoints,
exact resume, a NaN/inf guard, and DistributedDataParallel under torchrun.

>>> import torch
>>> from prunekit import TrainConfig, create_model, evaluate, fit, load_dataset
>>> data = load_dataset("synthetic")
>>> _ = torch.manual_seed(0)
>>> model = create_model("lenet300", num_classes=4, in_channels=1, input_size=12)
>>> result = fit(model, data, TrainConfig(epochs=2, lr=0.05), progress=False)
>>> result.best_val_acc > 0.5
True
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset, TensorDataset
from tqdm.auto import tqdm

from prunekit.configs import Config, config_from_dict
from prunekit.data import DataSplits
from prunekit.distributed import DistContext, GlobalBatchSampler, all_reduce_sum, barrier, current_context
from prunekit.persistence.checkpoint import CheckpointError, atomic_write, check_state_fits, save_checkpoint


class Schedule(str, enum.Enum):
    """Learning-rate schedule: cosine decay to zero, or step decay by ``gamma`` at ``milestones``."""

    COSINE = "cosine"
    STEP = "step"


class Augment(str, enum.Enum):
    """Training-time augmentation: none, random shifted crop, or crop plus horizontal flip."""

    NONE = "none"
    CROP = "crop"
    CROP_FLIP = "crop-flip"


# The fine-tuning recipe of a method's training when a job names none (``prunekit prune --lr --warmup``): the
# recipe with the best mean validation accuracy in benchmarks/finetune.py (a pruned ResNet-20, a LeNet-5 and a
# small-data LeNet-5; a higher rate helps the ResNet-20 but wrecks the small-data network).
FINETUNE_LR = 0.01
FINETUNE_WARMUP = 0.15


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass(frozen=True)
class TrainConfig(Config):
    """Optimisation settings.

    Args:
        epochs: Passes over the training set (0 only evaluates).
        batch_size: Global batch size (split across processes under torchrun).
        lr: Peak learning rate of SGD.
        momentum: SGD momentum (Nesterov when ``nesterov``).
        weight_decay: L2 penalty on all parameters.
        schedule: :class:`Schedule` of the learning rate, updated every step.
        warmup: Fraction of the steps over which the rate first rises linearly from ``lr / 25`` to ``lr`` (the
            one-cycle start, Smith and Topin 2019, arXiv 1708.07120); the schedule then runs over the rest.
        milestones: Fractions of training at which ``Schedule.STEP`` multiplies the rate by ``gamma``.
        gamma: Step-decay factor.
        augment: :class:`Augment` applied to training batches.
        seed: Seeds data order and augmentation (model initialisation is the caller's).
    """

    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: Schedule = Schedule.COSINE
    warmup: float = 0.0
    milestones: tuple[float, ...] = (0.5, 0.75)
    gamma: float = 0.1
    augment: Augment = Augment.NONE
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "schedule", _enum(Schedule, self.schedule, "schedule"))
        object.__setattr__(self, "augment", _enum(Augment, self.augment, "augment"))
        object.__setattr__(self, "milestones", tuple(float(m) for m in self.milestones))
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 0:
            raise ValueError(f"epochs must be a non-negative int, got {self.epochs!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {self.batch_size!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive finite number, got {self.lr!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if any(not 0 < m < 1 for m in self.milestones) or list(self.milestones) != sorted(self.milestones):
            raise ValueError(f"milestones must be increasing fractions in (0, 1), got {self.milestones!r}")
        if not 0 < self.gamma <= 1:
            raise ValueError(f"gamma must be in (0, 1], got {self.gamma!r}")
        if isinstance(self.warmup, bool) or not (isinstance(self.warmup, (int, float)) and 0 <= self.warmup < 1):
            raise ValueError(f"warmup must be a fraction of the steps in [0, 1), got {self.warmup!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["schedule"], d["augment"] = self.schedule.value, self.augment.value
        d["milestones"] = list(self.milestones)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return config_from_dict(cls, data)

    def lr_at(self, progress: float) -> float:
        """Learning rate after ``progress`` (0..1) of training."""
        if progress < self.warmup:
            return self.lr * (1 + 24 * progress / self.warmup) / 25
        if self.warmup:
            progress = (progress - self.warmup) / (1 - self.warmup)
        if self.schedule is Schedule.COSINE:
            return 0.5 * self.lr * (1.0 + math.cos(math.pi * progress))
        return self.lr * self.gamma ** sum(progress >= m for m in self.milestones)


def _enum(kind: type[enum.Enum], value: Any, name: str) -> Any:
    try:
        return kind(value)
    except ValueError:
        accepted = ", ".join(repr(m.value) for m in kind)
        raise ValueError(f"{name} must be one of {accepted}, got {value!r}") from None


@dataclass
class FitResult:
    """What :func:`fit` returns: per-epoch history and the best-on-validation epoch (weights loaded)."""

    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = -1
    best_val_acc: float = float("nan")
    out_dir: Path | None = None


# ------------------------------------------------------------------------------------------------ evaluate


@torch.no_grad()
def evaluate(model: nn.Module, dataset: TensorDataset, batch_size: int = 512,
             ctx: DistContext | None = None) -> dict[str, float]:
    """Mean cross-entropy and top-1 accuracy of ``model`` (eval mode) on ``dataset``.

    Under torch.distributed each process evaluates a disjoint shard and the sums are all-reduced.
    """
    ctx = ctx or current_context()
    module = model.module if isinstance(model, DistributedDataParallel) else model
    was_training = module.training
    module.eval()
    device = next(module.parameters()).device
    shard = Subset(dataset, range(ctx.rank, len(dataset), ctx.world_size)) if ctx.enabled else dataset
    loss_sum = correct = count = 0.0
    for x, y in DataLoader(shard, batch_size=batch_size):
        x, y = x.to(device), y.to(device)
        logits = module(x)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        count += len(y)
    loss_sum, correct, count = all_reduce_sum([loss_sum, correct, count], ctx)
    module.train(was_training)
    return {"loss": loss_sum / max(count, 1), "acc": correct / max(count, 1)}


# ------------------------------------------------------------------------------------------------------ fit


def augment_batch(x: torch.Tensor, mode: Augment, generator: torch.Generator) -> torch.Tensor:
    """Random shifts by up to 1/8 of the side (zero padding) and, for ``CROP_FLIP``, horizontal flips."""
    if mode is Augment.NONE:
        return x
    n, _, h, w = x.shape
    pad = max(1, h // 8)
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None]).to(x.device)  # (n, h)
    cols = (dx[:, None] + torch.arange(w)[None]).to(x.device)  # (n, w)
    out = padded[torch.arange(n, device=x.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    out = out.permute(0, 3, 1, 2)
    if mode is Augment.CROP_FLIP:
        flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
        out = torch.where(flip[:, None, None, None], out.flip(3), out)
    return out.contiguous()


class TrainHooks:
    """Extension points of :func:`fit` for methods that train under constraints (ADMM, masked retraining).

    ``before_epoch`` runs at the start of every epoch (also the first one after a resume: set per-epoch state such as
    a temperature here); ``penalty`` is added to the loss of every step; ``after_step`` runs after each optimizer step
    (re-apply masks, update ADMM variables every N steps); ``after_epoch`` after each epoch's training, before
    validation; ``before_step`` sees the gradients after backward, before the optimizer step (a regularizer that edits
    gradients, such as Torch-Pruning's); ``epoch_metrics`` returns numbers added to the epoch's history row (committed
    with it, so a resumed run keeps them); ``param_groups`` may split the parameters into optimizer groups, each with
    an ``lr_scale`` (times the scheduled learning rate) and its own ``weight_decay`` (e.g. mask logits: faster, no
    decay); ``state_dict``/``load_state_dict`` carry the hooks' own training state (a second optimizer's moments)
    through every epoch's commit, so a resumed run continues it exactly.
    """

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]] | None:
        return None

    def before_epoch(self, model: nn.Module, epoch: int) -> None:
        pass

    def epoch_metrics(self, model: nn.Module, epoch: int) -> dict[str, float]:
        return {}

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        return None

    def before_step(self, model: nn.Module) -> None:
        pass

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        pass

    def after_epoch(self, model: nn.Module, epoch: int) -> None:
        pass


def fit(
    model: nn.Module,
    data: DataSplits,
    config: TrainConfig,
    out_dir: str | Path | None = None,
    *,
    resume: bool = False,
    progress: bool = True,
    metadata: dict[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
    ctx: DistContext | None = None,
    hooks: TrainHooks | None = None,
    select_best: bool = True,
) -> FitResult:
    """Train ``model`` in place; afterwards it holds the weights of the best validation epoch (of the last epoch
    with ``select_best=False``, as ADMM needs: its variables follow the last weights).

    With ``out_dir``, every epoch is committed by one atomic write of ``train_state.pt`` (last and best weights,
    optimizer state, RNG state, history; read back with ``weights_only=True``), so a kill at any instant leaves
    either the previous epoch or the new one. ``last.safetensors`` and ``best.safetensors`` are written after the
    commit for users; they are views, rewritten from the commit on resume. ``resume=True`` continues from the last
    committed epoch and ends with exactly the weights (BatchNorm counters included) of an uninterrupted run.

    Raises:
        TrainingDivergedError: the loss became NaN/inf (the previous epoch's checkpoint stays on disk).
        CheckpointError: ``resume`` was asked for but the saved state does not match ``config``.
    """
    if not isinstance(getattr(data, "train", None), torch.utils.data.Dataset):
        raise ValueError(f"training reads labelled image batches (DataSplits); {type(data).__name__} has none. A "
                         "sentence encoder recovers by embedding distillation instead (--distill-steps, "
                         "prunekit.recovery.distill): set the method's training epochs (finetune_epochs, ...) to 0")
    ctx = ctx or current_context()
    hooks = hooks or TrainHooks()
    log = log or (lambda msg: None)
    metadata = dict(metadata or {})
    out = Path(out_dir) if out_dir is not None else None
    device = ctx.device
    model.to(device)
    net: nn.Module = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None) \
        if ctx.enabled else model
    optimizer = torch.optim.SGD(hooks.param_groups(model) or model.parameters(), lr=config.lr,
                                momentum=config.momentum, nesterov=config.nesterov and config.momentum > 0,
                                weight_decay=config.weight_decay)
    result = FitResult(out_dir=out)
    start_epoch = 0
    best_state: dict[str, torch.Tensor] | None = None
    if resume:
        if out is None:
            raise ValueError("resume=True needs out_dir, where the interrupted run saved its state")
        start_epoch, best_state = _restore(out, model, optimizer, config, result, hooks)
        if ctx.is_main:
            _write_views(out, model, best_state, metadata, config, result)
        log(f"resuming after epoch {start_epoch} of {config.epochs} from {out}")

    if config.batch_size < ctx.world_size:
        raise ValueError(f"batch_size {config.batch_size} is smaller than the {ctx.world_size} processes")
    sampler = GlobalBatchSampler(len(data.train), config.batch_size, ctx, seed=config.seed)
    loader = DataLoader(data.train, batch_sampler=sampler)
    steps_per_epoch = len(loader)
    total_steps = max(1, config.epochs * steps_per_epoch)

    for epoch in range(start_epoch, config.epochs):
        hooks.before_epoch(model, epoch)
        sampler.set_epoch(epoch)
        gen = torch.Generator().manual_seed(config.seed * 100_003 + epoch * 1_009 + ctx.rank)
        net.train()
        t0 = time.perf_counter()
        loss_sum = correct = count = 0.0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False,
                   disable=not (progress and ctx.is_main), dynamic_ncols=True)
        for step, (x, y) in enumerate(bar):
            lr = config.lr_at((epoch * steps_per_epoch + step) / total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            x = augment_batch(x.to(device), config.augment, gen)
            y = y.to(device)
            if len(y) == 0:  # a last global batch smaller than the number of processes
                raise ValueError(f"the last batch has fewer examples than the {ctx.world_size} processes; "
                                 "change --batch-size so the training set does not leave such a remainder")
            logits = net(x)
            loss = F.cross_entropy(logits, y)
            objective = loss
            if ctx.enabled:
                # DDP averages gradients over processes; scale each process's sum by the global batch count so
                # that an uneven last batch still gives exactly the gradient of the global mean loss.
                global_count = torch.tensor([float(len(y))], device=device)
                torch.distributed.all_reduce(global_count)
                objective = F.cross_entropy(logits, y, reduction="sum") * ctx.world_size / global_count[0]
            if not torch.isfinite(loss):
                where = f"; the last good checkpoint is {out / 'last.safetensors'}" if out and epoch > 0 else ""
                raise TrainingDivergedError(
                    f"loss became {loss.item()} at epoch {epoch + 1}, step {step + 1} (lr {lr:.4g}){where}; "
                    "lower --lr or check the data"
                )
            penalty = hooks.penalty(model)
            if penalty is not None:
                objective = objective + penalty
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
            hooks.before_step(model)
            optimizer.step()
            hooks.after_step(model, optimizer, epoch * steps_per_epoch + step)
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            count += len(y)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{loss_sum / count:.3f}", acc=f"{correct / count:.3f}")
        loss_sum, correct, count = all_reduce_sum([loss_sum, correct, count], ctx)
        hooks.after_epoch(model, epoch)
        val = evaluate(model, data.val, ctx=ctx)
        if not math.isfinite(val["loss"]):
            where = f"; the last good checkpoint is {out / 'last.safetensors'}" if out and epoch > 0 else ""
            raise TrainingDivergedError(
                f"validation loss became {val['loss']} after epoch {epoch + 1} (the weights diverged){where}; "
                "lower --lr or check the data")
        row = {"epoch": epoch + 1, "lr": lr if steps_per_epoch else config.lr, "train_loss": loss_sum / count,
               "train_acc": correct / count, "val_loss": val["loss"], "val_acc": val["acc"],
               "seconds": time.perf_counter() - t0}
        row.update({k: v for k, v in hooks.epoch_metrics(model, epoch).items() if k not in row})
        result.history.append(row)
        improved = not (val["acc"] <= result.best_val_acc) or not select_best  # NaN best: the first epoch
        if improved:
            result.best_epoch, result.best_val_acc = epoch + 1, val["acc"]
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        log(f"epoch {epoch + 1}/{config.epochs}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}  "
            f"val loss {val['loss']:.4f} acc {val['acc']:.4f}  ({row['seconds']:.1f}s)"
            + ("  *best" if improved else ""))
        if out is not None and ctx.is_main:
            _commit_epoch(out, model, best_state, optimizer, config, result, hooks)
            _write_views(out, model, best_state, metadata, config, result)
        barrier(ctx)

    if config.epochs == 0 or result.best_epoch < 0:
        val = evaluate(model, data.val, ctx=ctx)
        result.best_val_acc, result.best_epoch = val["acc"], 0
    elif best_state is not None:
        model.load_state_dict(best_state)
    return result


STATE_FORMAT = "prunekit.train_state/2"
HISTORY_KEYS = ("epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "seconds")


def _commit_epoch(out: Path, model: nn.Module, best_state: dict[str, torch.Tensor] | None,
                  optimizer: torch.optim.Optimizer, config: TrainConfig, result: FitResult,
                  hooks: TrainHooks) -> None:
    """Write everything a resume needs in one file, atomically: this write is the epoch's commit."""
    state = {
        "format": STATE_FORMAT,
        "config": config.to_dict(),
        "history": result.history,
        "best_epoch": result.best_epoch,
        "best_val_acc": result.best_val_acc,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "best_model": {k: v.cpu() for k, v in (best_state or {}).items()},
        "optimizer": optimizer.state_dict(),
        "hooks": hooks.state_dict(),
        "rng": torch.get_rng_state(),
    }
    atomic_write(out / "train_state.pt", lambda tmp: torch.save(state, tmp))


def _write_views(out: Path, model: nn.Module, best_state: dict[str, torch.Tensor] | None,
                 metadata: dict[str, Any], config: TrainConfig, result: FitResult) -> None:
    """``last.safetensors`` and ``best.safetensors``, each a loadable checkpoint of what the commit holds."""
    if not result.history:
        return
    last = result.history[-1]
    meta = {**metadata, "train": config.to_dict(), "epoch": last["epoch"],
            "metrics": {"val_acc": last["val_acc"], "val_loss": last["val_loss"]}}
    save_checkpoint(out / "last.safetensors", model, meta)
    if best_state is not None:
        best = result.history[result.best_epoch - 1]
        best_meta = {**meta, "epoch": best["epoch"], "metrics": {"val_acc": best["val_acc"],
                                                                 "val_loss": best["val_loss"]}}
        save_checkpoint(out / "best.safetensors", _StateHolder(best_state), best_meta)


class _StateHolder(nn.Module):
    """Lets :func:`save_checkpoint` write a bare state_dict."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self._state = state

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return self._state


def _restore(out: Path, model: nn.Module, optimizer: torch.optim.Optimizer, config: TrainConfig,
             result: FitResult, hooks: TrainHooks) -> tuple[int, dict[str, torch.Tensor] | None]:
    """Load the last commit into ``model``, ``optimizer``, ``result`` and the RNG; returns (epochs done, best)."""
    state_path = out / "train_state.pt"
    if not state_path.is_file():
        raise CheckpointError(f"nothing to resume in {out}: train_state.pt is missing")
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a corrupted file is a user-facing condition
        raise CheckpointError(f"{state_path} is corrupted ({exc.__class__.__name__}); {_fresh_start(state_path)}"
                              ) from None
    if isinstance(state, dict) and isinstance(state.get("config"), dict):  # settings first: the likelier mistake
        saved = state["config"]
        defaults = TrainConfig().to_dict()  # a field added since the run started has its default there
        diff = {k: (saved.get(k, defaults[k]), v) for k, v in config.to_dict().items()
                if saved.get(k, defaults[k]) != v}
        if diff:
            desc = ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in diff.items())
            raise CheckpointError(f"cannot resume {out}: training settings differ ({desc})")
    _check_state(state, state_path, config)
    check_state_fits(model, state["model"], f"{state_path} (model)")
    if state["best_model"]:
        check_state_fits(model, state["best_model"], f"{state_path} (best_model)")
    try:
        optimizer.load_state_dict(state["optimizer"])
        hooks.load_state_dict(state.get("hooks", {}))
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"{state_path}: the optimizer state does not fit this model and optimizer "
                              f"({exc.__class__.__name__}: {exc}); {_fresh_start(state_path)}") from None
    model.load_state_dict(state["model"])
    torch.set_rng_state(state["rng"])
    result.history = [dict(row) for row in state["history"]]
    result.best_epoch, result.best_val_acc = state["best_epoch"], float(state["best_val_acc"])
    return len(result.history), (dict(state["best_model"]) or None)


def _fresh_start(path: Path) -> str:
    return f"it cannot be resumed: choose another --out, or delete {path} to start over"


def _check_state(state: Any, path: Path, config: TrainConfig) -> None:
    """The commit's structure, field by field, with the first bad field named."""

    def bad(field: str, expected: str) -> CheckpointError:
        return CheckpointError(f"{path}: field {field!r} must be {expected} (the file was edited or not written by "
                               f"this version of prunekit); {_fresh_start(path)}")

    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a prunekit training state; "
                              f"{_fresh_start(path)}")
    if state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path} has format {state.get('format')!r}, not {STATE_FORMAT!r} (written by an older "
                              f"prunekit, whose epochs were not committed atomically); {_fresh_start(path)}")
    if not isinstance(state.get("config"), dict):
        raise bad("config", "an object")
    history = state.get("history")
    if not isinstance(history, list) or len(history) > config.epochs:
        raise bad("history", f"a list of at most {config.epochs} epochs")
    for i, row in enumerate(history):
        if not isinstance(row, dict) or any(not isinstance(row.get(k), (int, float)) for k in HISTORY_KEYS):
            raise bad(f"history[{i}]", f"an object with numbers {', '.join(HISTORY_KEYS)}")
        if row["epoch"] != i + 1:
            raise bad(f"history[{i}].epoch", f"{i + 1}")
    best = state.get("best_epoch")
    if isinstance(best, bool) or not isinstance(best, int) or not (-1 <= best <= len(history)) or \
            (history and best < 1):
        raise bad("best_epoch", f"an int in 1..{len(history)}")
    if not isinstance(state.get("best_val_acc"), (int, float)):
        raise bad("best_val_acc", "a number")
    for key in ("model", "best_model"):
        tensors = state.get(key)
        if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                    for k, v in tensors.items()):
            raise bad(key, "an object of tensors")
    if history and not state["best_model"]:
        raise bad("best_model", "the best epoch's tensors")
    optimizer = state.get("optimizer")
    if not isinstance(optimizer, dict) or not isinstance(optimizer.get("state"), dict) or \
            not isinstance(optimizer.get("param_groups"), list):
        raise bad("optimizer", "an optimizer state_dict (state, param_groups)")
    if not isinstance(state.get("hooks", {}), dict):
        raise bad("hooks", "an object (the training hooks' state)")
    rng = state.get("rng")
    if not isinstance(rng, torch.Tensor) or rng.dtype != torch.uint8:
        raise bad("rng", "a torch RNG state (uint8 tensor)")
