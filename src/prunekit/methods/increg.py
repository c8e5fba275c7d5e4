"""IncReg: structured pruning by incremental regularization (Wang, Zhang, Wang, Lu, Hu 2018, arXiv 1804.09461).

Every unit (channel, tied channel set or head) ``u`` of a prunable group gets its own L2 penalty factor
``lambda_u``, and training minimises ``L(W) + sum_u lambda_u / 2 * ||W_u||^2`` over the slices that produce the
unit. Every ``interval`` steps the units of each group are ranked by L1 norm (rank 0 the least important) and the
factors move by the paper's rank-based increment, ``lambda_u <- clip(lambda_u + dlambda(r_u), 0, ceiling)`` with
``dlambda(r) = A (1 - r/m)`` below the ``m`` units the target removes and ``-A (r - m)/(N - m)`` above
(:func:`~prunekit.methods.group_training.rank_increment`), so the penalties of the least important units grow until
their weights are driven to zero, while the kept units are released. Afterwards the ``m`` units of each group with
the largest factor (ties: the smaller norm) are removed physically and the network is fine-tuned. A factor at the
ceiling can fall again if its unit's rank rises (the authors' solver instead prunes such a unit for good and ranks the
rest against a smaller ``m``).

Deviations from the paper: the ranking and the removal are per coupled channel group of the channel engine (a
residual stage's channels together), not per layer, and units are ranked by the L1 norm of the slices that produce
them (the paper ranks the next layer's im2col columns); ``m`` per group follows from a FLOPs/params/channels target
with the same fraction of every group (the paper's per-layer ratio); the training budget is a number of epochs
rather than "until every factor reaches the ceiling", so units still carrying weight at the end are zeroed before
removal (``results["removed_l1_share"]`` says how much weight they still held); the amplitude defaults to what lets
the least important unit reach the ceiling half way through the budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from prunekit.channels.graph import ChannelGraph
from prunekit.methods.group_training import (
    GroupUnits,
    RankIncrementConfig,
    rank_increment,
    removal_counts,
    train_then_remove_,
)
from prunekit.methods.registry import MethodSpec, PruneRecord, RunContext, register
from prunekit.training import TrainHooks


@dataclass(frozen=True)
class IncRegConfig(RankIncrementConfig):
    """IncReg (Wang et al. 2018): per-unit L2 penalties that grow by rank until the least important units are
    driven to zero, then removed.

    Args:
        epochs: Epochs of regularized training (the penalties grow during them).
        ceiling: The largest penalty factor (a unit at the ceiling is being driven out).
    """

    ceiling: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.ceiling, bool) or not isinstance(self.ceiling, (int, float)) or \
                not 0 < self.ceiling < 1e6:
            raise ValueError(f"ceiling must be a number in (0, 1e6), got {self.ceiling!r}")


class IncRegHooks(TrainHooks):
    """The growing penalty of every unit: added to each step's loss, its factors updated every ``interval``
    steps, carried through every epoch's commit."""

    def __init__(self, units: GroupUnits, amplitude: float, ceiling: float, interval: int) -> None:
        self.units, self.amplitude, self.ceiling, self.interval = units, amplitude, ceiling, interval
        self.factors = {root: torch.zeros(g.units, dtype=torch.float64) for root, g in units.groups.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"factors": {k: v.clone() for k, v in self.factors.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.factors = {k: v.clone().double() for k, v in state["factors"].items()}

    def update(self) -> None:
        """One rank-based increment of every factor."""
        for root, ranks in self.units.ranks().items():
            step = rank_increment(ranks, self.units.groups[root].remove, self.amplitude, "linear")
            self.factors[root] = (self.factors[root] + step).clamp(0.0, self.ceiling)

    def penalty(self, model: nn.Module) -> torch.Tensor:
        total = None
        for root, norms in self.units.squared_norms().items():
            term = 0.5 * (self.factors[root].to(norms) * norms).sum()
            total = term if total is None else total + term
        return total

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        if (step + 1) % self.interval == 0:
            self.update()

    def epoch_metrics(self, model: nn.Module, epoch: int) -> dict[str, float]:
        at = sum(int((f >= self.ceiling).sum()) for f in self.factors.values())
        return {"units_at_ceiling": at / self.units.total(),
                "mean_factor": float(torch.cat(list(self.factors.values())).mean())}

    def choose(self) -> dict[str, list[int]]:
        """Per group, the ``m`` units with the largest factor (ties: the smaller L1 norm)."""
        norms = self.units.l1()
        out = {}
        for root, g in self.units.groups.items():
            order = sorted(range(g.units), key=lambda u: (-float(self.factors[root][u]), float(norms[root][u])))
            out[root] = sorted(order[:g.remove])
        return out


def removed_l1_share(units: GroupUnits, removed: dict[str, list[int]]) -> float:
    """The share of the groups' L1 weight that the chosen units still hold (0: driven out completely)."""
    norms = units.l1()
    total = sum(float(n.sum()) for n in norms.values())
    gone = sum(float(norms[root][u].sum()) for root, u in removed.items())
    return gone / total if total > 0 else 0.0


def increg_(model: nn.Module, data, config: IncRegConfig, ctx: RunContext) -> PruneRecord:
    """IncReg on ``model`` in place (the ``apply`` of the ``increg`` method)."""
    graph = ChannelGraph(model, data.example_inputs(), ignore=config.ignore)
    units = GroupUnits(model, graph, removal_counts(model, graph, data.flops_inputs(), config.target))
    updates = config.updates(data, ctx.train)
    amplitude = config.amplitude or config.ceiling / max(1, updates // 2)
    hooks = IncRegHooks(units, amplitude, config.ceiling, config.interval)
    share: list[float] = []

    def choose() -> dict[str, list[int]]:
        removed = hooks.choose()
        share.append(removed_l1_share(units, removed))
        return removed

    record, _ = train_then_remove_(model, data, units, hooks, config.epochs, choose, ctx, method=config.method,
                                   bn_images=config.bn_images, finetune_epochs=config.finetune_epochs,
                                   ignore=config.ignore)
    record.results["removed_l1_share"] = share[0]
    record.results["amplitude"] = amplitude
    record.notes.append(f"{config.epochs} epoch(s) of incremental regularization (A {amplitude:.3g} every "
                        f"{config.interval} steps, ceiling {config.ceiling:g}); the removed units still held "
                        f"{share[0]:.2%} of the groups' L1 weight when zeroed; {config.finetune_epochs} fine-tune "
                        "epoch(s) after the removal")
    return record


register(MethodSpec("increg", IncRegConfig, increg_,
                    "Wang et al. 2018, Structured Pruning for Efficient ConvNets via Incremental Regularization, "
                    "arXiv 1804.09461",
                    "per-unit L2 penalties grown by rank until the least important channels vanish, then removed"))
