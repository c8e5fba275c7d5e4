"""When to remove: one-shot or iterative rounds, annealing over the epochs of a gradual method, and resumable
phases (the third of the independent choices, next to criterion, allocation and pattern).

* :class:`RoundSchedule` -- ``iterations`` rounds of prune, recover and fine-tune; round ``r`` of ``k`` keeps
  ``keep ** (r / k)`` of the dense metric (geometric spacing, as in iterative pruning; one round is one-shot).
* :class:`StageSchedule` -- progressive stages of rising pruning rate (ADMM-NN-S's 10x -> 30x -> 60x -> 100x), each
  pruning further from the last, stopped at the last stage whose validation accuracy is within a tolerance;
* :class:`TemperatureSchedule` -- the temperature of a relaxation annealed epoch by epoch (DPP's Gumbel-softmax),
  linear or exponential, indexed by epoch so that a resumed epoch sees the same value.
* :class:`Phases` -- named phases (ADMM's pruning, retraining, quantization steps) whose end states are saved, so
  that a resumed run skips the phases it finished and loses at most the one it was in.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.configs import Config, coerce_fields
from prunekit.planning.allocation import Target


@dataclass(frozen=True)
class RoundSchedule(Config):
    """Rounds of prune, recover and fine-tune.

    Args:
        iterations: Rounds (1 = one-shot); round ``r`` of ``k`` keeps ``keep ** (r / k)`` of the dense metric.
    """

    iterations: int = 1

    MAX_ITERATIONS = 100  # every round scores, shrinks and fine-tunes; more rounds than this is a typo

    def __post_init__(self) -> None:
        coerce_fields(self)
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or \
                not 1 <= self.iterations <= self.MAX_ITERATIONS:
            raise ValueError(f"iterations must be an int >= 1 and at most {self.MAX_ITERATIONS} (rounds of prune + "
                             f"fine-tune; iterative pruning uses 3 to 10), got {self.iterations!r}")

    def keep_after(self, round_: int, target: Target) -> float:
        """Fraction of the dense metric kept after round ``round_`` (1-based)."""
        return target.keep ** (round_ / self.iterations)

    def round_target(self, round_: int, target: Target, kept_now: float) -> Target:
        """What round ``round_`` asks of the model as it is now, which keeps ``kept_now`` of the dense metric."""
        return Target(target.metric, min(0.999, self.keep_after(round_, target) / kept_now))


@dataclass(frozen=True)
class StageSchedule(Config):
    """Progressive pruning: stages of rising rate, each starting from the last one's weights, whose zeros stay zero.

    ADMM-NN (Ren et al. 2019, arXiv 1812.11677) and ADMM-NN-S (Ma et al. 2019, arXiv 1907.02124) reach rates such as
    100x on LeNet-5 through stages (for example 10x -> 30x -> 60x -> 100x): stage ``s`` keeps
    ``1 / rate_s`` of the weights, chosen among those stage ``s - 1`` kept.

    Args:
        rates: Pruning rates (dense weights / kept weights) of the stages before the target's, rising, each below
            the target's rate (empty: one stage, straight to the target).
        tolerance: Validation accuracy points below the dense model that a stage may lose; the run stops after the
            first stage beyond it and keeps the stage before (none: run every stage, keep the last).
    """

    rates: tuple[float, ...] = dataclasses.field(default=(), metadata={"flag": "--stages"})
    tolerance: float | None = dataclasses.field(default=None, metadata={"flag": "--stage-tolerance"})

    def __post_init__(self) -> None:
        coerce_fields(self)
        rates = tuple(float(r) for r in self.rates)
        if any(not (math.isfinite(r) and r > 1) for r in rates) or any(a >= b for a, b in zip(rates, rates[1:])):
            raise ValueError(f"stage rates must rise and each be > 1 (10 keeps a tenth of the weights), e.g. "
                             f"--stages 10 30 60; got {list(self.rates)}")
        if self.tolerance is not None and not (math.isfinite(self.tolerance) and 0 <= self.tolerance <= 100):
            raise ValueError(f"the stage tolerance is in accuracy points, between 0 and 100, got {self.tolerance!r}")
        object.__setattr__(self, "rates", rates)

    def keeps(self, target: Target) -> list[float]:
        """The fraction of the weights each stage keeps; the last is the target's.

        Raises:
            ValueError: a stage's rate is not below the target's.
        """
        if self.rates and 1 / self.rates[-1] <= target.keep:
            raise ValueError(f"every stage rate must be below the target's x{1 / target.keep:g} (the last stage), got "
                             f"stages {[f'x{r:g}' for r in self.rates]}")
        return [1 / r for r in self.rates] + [target.keep]

    def within(self, val_acc: float, dense_val_acc: float) -> bool:
        """Whether a stage with validation accuracy ``val_acc`` is within the tolerance (always, without one)."""
        return self.tolerance is None or 100 * (dense_val_acc - val_acc) <= self.tolerance + 1e-9


class Annealing(str, enum.Enum):
    LINEAR = "linear"
    EXPONENTIAL = "exponential"


@dataclass(frozen=True)
class TemperatureSchedule(Config):
    """``T(epoch)`` from ``start`` towards ``end`` over the method's epochs, never below ``floor``.

    Args:
        start: Temperature of the first epoch.
        end: Temperature of the last epoch.
        mode: Linear steps, or exponential decay ``start * (end / start) ** (epoch / (epochs - 1))``.
        floor: Lowest temperature.
    """

    start: float = dataclasses.field(default=1.0, metadata={"flag": "--temperature-start"})
    end: float = dataclasses.field(default=0.05, metadata={"flag": "--temperature-end"})
    mode: Annealing = dataclasses.field(default=Annealing.EXPONENTIAL, metadata={"flag": "--temperature-mode"})
    floor: float = dataclasses.field(default=0.01, metadata={"flag": "--temperature-floor"})

    def __post_init__(self) -> None:
        coerce_fields(self)
        for name in ("start", "end", "floor"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
                raise ValueError(f"temperature {name} must be > 0, got {v!r}")

    def at(self, epoch: int, epochs: int) -> float:
        """The temperature of ``epoch`` (0-based) of ``epochs``."""
        frac = min(max(epoch, 0) / max(epochs - 1, 1), 1.0)
        if self.mode is Annealing.LINEAR:
            t = self.start + (self.end - self.start) * frac
        else:
            t = self.start * (self.end / self.start) ** frac
        return max(t, self.floor)


class Phases:
    """Run named phases in order, each at most once per run folder.

    After a phase, :meth:`run` saves the model's state, the phase's tensors (``extra``) and its JSON record to
    ``folder/NAME.pt`` atomically. When that file exists the phase is not run again: the state is loaded into the
    model and the saved tensors and record are returned, so a killed run resumes after its last finished phase.
    Without a folder the phases simply run.
    """

    def __init__(self, folder: str | Path | None, log: Callable[[str], None] = lambda _: None) -> None:
        self.folder = Path(folder) if folder is not None else None
        self.log = log

    def saved(self, name: str) -> dict[str, Any] | None:
        """What phase ``name`` saved (``model``: its end state, ``tensors``, ``record``, ``rng``), or ``None`` when it
        has not finished (or there is no folder).

        Raises:
            CheckpointError: the phase file is unreadable.
        """
        from prunekit.persistence.checkpoint import CheckpointError

        path = self.folder / f"{name}.pt" if self.folder is not None else None
        if path is None or not path.is_file():
            return None
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            return {"model": saved["model"], "tensors": saved["tensors"], "record": json.loads(saved["record"]),
                    "rng": saved["rng"]}
        except Exception as exc:  # noqa: BLE001 - any unreadable phase file is a user-facing condition
            raise CheckpointError(f"{path} is unreadable ({exc.__class__.__name__}); delete it to run the phase "
                                  "again") from None

    def run(self, name: str, model: nn.Module, phase: Callable[[], tuple[dict[str, torch.Tensor], dict[str, Any]]],
            prepare: Callable[[dict[str, Any]], None] = lambda record: None
            ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """``phase()`` returns ``(tensors, record)``; both are loaded back instead when the phase is done, after
        ``prepare(record)`` has made the model's architecture what the phase left (a phase that removed channels
        replays its change there)."""
        from prunekit.persistence.checkpoint import atomic_write, check_state_fits

        path = self.folder / f"{name}.pt" if self.folder is not None else None
        saved = self.saved(name)
        if saved is not None:
            state, tensors, record = saved["model"], saved["tensors"], saved["record"]
            prepare(record)
            check_state_fits(model, state, path)
            model.load_state_dict(state)
            torch.set_rng_state(saved["rng"])
            self.log(f"phase {name}: done in an earlier run, loaded from {path}")
            return tensors, record
        tensors, record = phase()
        if path is not None:
            payload = {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                       "tensors": {k: v.detach().cpu() for k, v in tensors.items()},
                       "record": json.dumps(record), "rng": torch.get_rng_state()}
            atomic_write(path, lambda tmp: torch.save(payload, tmp))
        return tensors, record
