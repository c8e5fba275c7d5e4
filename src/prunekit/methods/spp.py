"""SPP: structured probabilistic pruning (Wang, Zhang, Wang, Hu 2017, arXiv 1709.06994).

Every unit (channel, tied channel set or head) ``u`` of a prunable group has a pruning probability ``p_u``, starting
at 0. Every ``interval`` steps the units of each group are ranked by L1 norm (rank 0 the least important) and ``p_u <-
clip(p_u + dp(r_u), 0, 1)`` with the paper's centrosymmetric increment, in the form of its authors' released solver:
``dp(r) = A exp(-a r)`` up to ``N_c = -ln(u)/a`` and ``2uA - A exp(-a (2 N_c - r))`` above, ``a = ln(2/u)/m``, zero at
the ``m``-th rank (:func:`~prunekit.methods.group_training.rank_increment`). As in that solver, ``r`` is the unit's
rank averaged over all updates so far, so units near the boundary do not flip. At every training step a mask is
*sampled*: unit ``u`` is zeroed (all the slices that produce it) with probability ``p_u``, so a unit pruned by mistake
comes back when its probability falls again. A unit whose probability reaches 1 is out for good; evaluation keeps
exactly the units below 1. When the budget ends, the ``m`` units of each group with the highest probability (ties: the
smaller norm) are removed physically and the network is fine-tuned.

Deviations from the paper: units are the channel engine's coupled channel groups, ranked by the L1 norm of the slices
that produce them (the paper ranks the weight columns of the im2col matrix, which it also prunes); ``m`` per group
follows from a FLOPs/params/channels target with the same fraction of every group; training runs a number of epochs
rather than until every group meets its ratio, so units that have not reached probability 1 by then are removed by
rank of probability (``results["reached_one"]`` says how many did); the amplitude defaults to what lets the least
important unit reach 1 half way through the budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from prunekit.channels.graph import ChannelGraph
from prunekit.methods.group_training import (
    GroupUnits,
    RankIncrementConfig,
    SliceMask,
    rank_increment,
    removal_counts,
    train_then_remove_,
)
from prunekit.methods.registry import MethodSpec, PruneRecord, RunContext, register
from prunekit.training import TrainHooks


@dataclass(frozen=True)
class SPPConfig(RankIncrementConfig):
    """SPP (Wang et al. 2017): per-unit pruning probabilities raised by rank, masks sampled from them in training.

    Args:
        epochs: Epochs of training with sampled masks.
        amplitude: The paper's ``A``, the largest probability increment per update, at most 1 (``None``: the least
            important unit reaches 1 half way through ``epochs``).
        u: The height of the increment's centre of symmetry as a share of ``A`` (the paper's ``u``), in (0, 0.5).
    """

    u: float = 0.25

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.amplitude is not None and self.amplitude > 1:
            raise ValueError(f"amplitude is a probability step: it must be in (0, 1], got {self.amplitude!r}")
        if isinstance(self.u, bool) or not isinstance(self.u, (int, float)) or not 0 < self.u < 0.5:
            raise ValueError(f"u must be in (0, 0.5), got {self.u!r}")


class UnitDraw:
    """One group's probabilities and this step's sampled channel mask (1 keeps, 0 drops)."""

    def __init__(self, units: GroupUnits, root: str, generator: torch.Generator) -> None:
        self.group = units.groups[root]
        self.probability = torch.zeros(self.group.units, dtype=torch.float64)
        self.generator, self.training = generator, True
        self._draw: torch.Tensor | None = None

    def unit_mask(self) -> torch.Tensor:
        """Training: unit ``u`` kept with probability ``1 - p_u`` (a fresh draw after every step); evaluation:
        the units whose probability is below 1."""
        if not self.training:
            return (self.probability < 1).double()
        if self._draw is None:
            self._draw = (torch.rand(self.group.units, generator=self.generator, dtype=torch.float64)
                          >= self.probability).double()
        return self._draw

    def channel_mask(self) -> torch.Tensor:
        return self.unit_mask()[self.group.channel_unit].float()

    def resample(self) -> None:
        self._draw = None


class SPPHooks(TrainHooks):
    """Probabilities updated every ``interval`` steps, a fresh mask per step, evaluation with the units below 1;
    the probabilities and the sampler's state go through every epoch's commit."""

    def __init__(self, units: GroupUnits, draws: dict[str, UnitDraw], amplitude: float, interval: int,
                 generator: torch.Generator, u: float = 0.25) -> None:
        self.units, self.draws, self.amplitude, self.interval, self.generator = units, draws, amplitude, interval, \
            generator
        self.u, self.updates = u, 0
        self.mean_rank = {root: torch.zeros(g.units, dtype=torch.float64) for root, g in units.groups.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"probability": {k: d.probability.clone() for k, d in self.draws.items()},
                "mean_rank": {k: r.clone() for k, r in self.mean_rank.items()}, "updates": self.updates,
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, p in state["probability"].items():
            self.draws[k].probability = p.clone().double()
        self.mean_rank = {k: r.clone().double() for k, r in state["mean_rank"].items()}
        self.updates = int(state["updates"])
        self.generator.set_state(state["generator"])
        self._train(False)  # as after the last committed epoch (a resume with nothing left to train evaluates)

    def update(self) -> None:
        """One rank-based increment of every probability, by the rank averaged over all updates; a unit at 1
        stays at 1."""
        self.updates += 1
        for root, ranks in self.units.ranks().items():
            draw = self.draws[root]
            self.mean_rank[root] += (ranks.double() - self.mean_rank[root]) / self.updates
            step = rank_increment(self.mean_rank[root], self.units.groups[root].remove, self.amplitude,
                                  "exponential", self.u)
            done = draw.probability >= 1
            draw.probability = torch.where(done, torch.ones_like(step), (draw.probability + step).clamp(0.0, 1.0))

    def before_epoch(self, model: nn.Module, epoch: int) -> None:
        self._train(True)

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        if (step + 1) % self.interval == 0:
            self.update()
        for d in self.draws.values():
            d.resample()

    def after_epoch(self, model: nn.Module, epoch: int) -> None:
        self._train(False)  # validation sees the deterministic mask

    def _train(self, on: bool) -> None:
        for d in self.draws.values():
            d.training = on
            d.resample()

    def epoch_metrics(self, model: nn.Module, epoch: int) -> dict[str, float]:
        return {"reached_one": sum(int((d.probability >= 1).sum()) for d in self.draws.values()) / self.units.total(),
                "mean_probability": float(torch.cat([d.probability for d in self.draws.values()]).mean())}

    def choose(self) -> dict[str, list[int]]:
        """Per group, the ``m`` units with the highest probability (ties: the smaller L1 norm)."""
        norms = self.units.l1()
        out = {}
        for root, g in self.units.groups.items():
            p = self.draws[root].probability
            order = sorted(range(g.units), key=lambda u: (-float(p[u]), float(norms[root][u])))
            out[root] = sorted(order[:g.remove])
        return out


def spp_(model: nn.Module, data, config: SPPConfig, ctx: RunContext) -> PruneRecord:
    """SPP on ``model`` in place (the ``apply`` of the ``spp`` method)."""
    graph = ChannelGraph(model, data.example_inputs(), ignore=config.ignore)
    units = GroupUnits(model, graph, removal_counts(model, graph, data.flops_inputs(), config.target))
    updates = config.updates(data, ctx.train)
    amplitude = config.amplitude or min(1.0, 2.0 / updates)
    generator = torch.Generator().manual_seed(ctx.seed)
    draws = {root: UnitDraw(units, root, generator) for root in units.groups}
    hooks = SPPHooks(units, draws, amplitude, config.interval, generator, config.u)
    modules = dict(model.named_modules())
    registered = []
    reached: list[int] = []

    def release() -> None:  # the raw weights back
        for module, attr in registered:
            if parametrize.is_parametrized(module, attr):
                parametrize.remove_parametrizations(module, attr, leave_parametrized=False)

    def choose() -> dict[str, list[int]]:
        release()  # the chosen units are zeroed next
        reached.append(sum(int((d.probability >= 1).sum()) for d in draws.values()))
        return hooks.choose()

    try:
        for root, g in units.groups.items():
            for _, s in g.slices:
                module_name, _, attr = s.name.rpartition(".")
                parametrize.register_parametrization(modules[module_name], attr, SliceMask(draws[root], s))
                registered.append((modules[module_name], attr))
        record, _ = train_then_remove_(model, data, units, hooks, config.epochs, choose, ctx, method=config.method,
                                       bn_images=config.bn_images,
                                       finetune_epochs=config.finetune_epochs, ignore=config.ignore)
    finally:
        release()
    record.results.update(reached_one=reached[0] / units.total(), amplitude=amplitude)
    record.notes.append(f"{config.epochs} epoch(s) with masks sampled from per-unit pruning probabilities (A "
                        f"{amplitude:.3g} every {config.interval} steps); {reached[0]} of {units.total()} removed "
                        f"units had reached probability 1, the rest were removed by rank of probability; "
                        f"{config.finetune_epochs} fine-tune epoch(s) after the removal")
    return record


register(MethodSpec("spp", SPPConfig, spp_,
                    "Wang et al. 2017, Structured Probabilistic Pruning for Convolutional Neural Network "
                    "Acceleration, arXiv 1709.06994",
                    "per-unit pruning probabilities raised by rank, masks sampled in training, then removal"))
