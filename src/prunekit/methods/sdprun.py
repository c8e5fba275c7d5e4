"""sDprun: structured directional pruning (Li, Liu, Shao, Wang, Geng 2021, arXiv 2107.05328).

The conv/linear weights that produce the prunable units are trained by generalized regularized dual averaging (gRDA,
Chao et al. 2020, arXiv 2006.09358) with a group penalty instead of SGD: an accumulator ``a_{n+1} = a_n - gamma_n
grad`` (from ``a_0 = w_0``) is shrunk unit by unit, ``w_u = (1 - g(n) sqrt(d_u) / ||a_u||)_+ a_u`` with the growing
threshold ``g(n) = c sqrt(gamma) (n gamma)^mu`` (``d_u``: the unit's number of weights). Because the shrinkage acts on
the accumulated gradient path rather than on the weights, the pruned network moves along the flat valley that SGD
found instead of being pulled straight to zero; units whose accumulator falls under the threshold are exactly zero.
Everything else (BatchNorm scales and shifts, the output layer, ignored layers) trains by the job's SGD; a BatchNorm
after a zeroed channel still adds its shift, which leaves with the channel (BatchNorm is re-estimated and the network
fine-tuned after the removal). The training loss before and after is reported
(``results["train_loss_before"]``/``["train_loss_after_training"]``), since the method's claim is that it stays in the
minimum valley.

Deviations from the paper: units are the channel engine's coupled channel groups; ``m`` per group follows from a
FLOPs/params/channels target with the same fraction of every group, and the ``m`` units of each group with the
smallest ``||w_u|| / sqrt(d_u)`` (conv/linear entries) are removed when the budget ends
(``results["zeroed_by_optimizer"]`` says how many of them gRDA had already set to zero); ``gamma_n`` follows the job's
learning-rate schedule and ``gamma`` in ``g`` is its peak; ``c`` defaults to one value per group, at which the group's
final threshold is a tenth of its ``m``-th smallest initial ``||w_u|| / sqrt(d_u)``: with a threshold reaching the
``m``-th norm itself within a three-epoch budget, a ResNet-20 on digits ended gRDA at training loss 2.60 (0.30 of it:
0.56; a tenth: 0.05, from 0.01), so within a short budget few units reach zero and the rest of the ``m`` go by norm.
One ``c`` for all groups zeroed whole groups of a LeNet-5, and thresholding the BatchNorm scales and shifts as well
collapsed a ResNet-20.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from prunekit.channels.graph import ChannelGraph
from prunekit.methods.group_training import GroupUnits, UnitTrainingConfig, removal_counts, train_then_remove_
from prunekit.methods.registry import MethodSpec, PruneRecord, RunContext, register
from prunekit.training import TrainHooks


@dataclass(frozen=True)
class SDprunConfig(UnitTrainingConfig):
    """sDprun (Li et al. 2021): group-penalised gRDA on the units' producing weights, zeroed units removed.

    Args:
        epochs: Epochs of gRDA training.
        c: Threshold scale ``c`` of ``g(n) = c sqrt(gamma) (n gamma)^mu`` (``None``: calibrated per group from the
            initial unit norms and the budget).
        mu: Threshold growth exponent ``mu`` (the gRDA paper uses 0.5 to 0.7).
    """

    c: float | None = None
    mu: float = 0.51

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.c is not None and not (isinstance(self.c, (int, float)) and 0 < self.c < math.inf):
            raise ValueError(f"c must be a number > 0 (or None: calibrated), got {self.c!r}")
        if isinstance(self.mu, bool) or not isinstance(self.mu, (int, float)) or not 0 < self.mu <= 1:
            raise ValueError(f"mu must be in (0, 1], got {self.mu!r}")


class GRDAHooks(TrainHooks):
    """The producing weights of every unit follow group-thresholded dual averaging; the job's SGD leaves them
    alone (learning-rate scale 0) and trains the rest. Accumulators and the step count go through every commit."""

    def __init__(self, units: GroupUnits, c: dict[str, float], mu: float, train, steps_per_epoch: int,
                 epochs: int) -> None:
        self.units, self.c, self.mu, self.train = units, c, mu, train
        self.slices = {root: [(p, s) for p, s in g.slices if not s.is_norm and _weight_layer(units, s.name)]
                       for root, g in units.groups.items()}
        self.total = max(1, steps_per_epoch * epochs)
        self.params: list[nn.Parameter] = []
        seen: set[int] = set()
        for slices in self.slices.values():
            for param, _ in slices:
                if id(param) not in seen:
                    seen.add(id(param))
                    self.params.append(param)
        self.accumulators = [p.detach().clone() for p in self.params]
        self.steps = 0
        # entries per unit: the threshold scales with sqrt(d_u)
        self.position = {id(p): i for i, p in enumerate(self.params)}  # parameter -> its accumulator
        self.sizes = {root: self._per_unit(root, [p for p, _ in self.slices[root]],
                                           lambda rows: torch.full((rows.shape[0],), float(rows.shape[1]),
                                                                   dtype=torch.float64))
                      for root in units.groups}

    def _per_unit(self, root: str, tensors: list[torch.Tensor], per_row) -> torch.Tensor:
        """Per unit of ``root``, ``per_row(rows)`` summed over its conv/linear slices, reading ``tensors`` (the
        parameters or their accumulators, in the order of the slices)."""
        group = self.units.groups[root]
        units = torch.zeros(group.units, dtype=torch.float64)
        for t, (_, s) in zip(tensors, self.slices[root]):
            rows = t.detach().index_select(s.dim, s.idxs.to(t.device)).movedim(s.dim, 0).reshape(len(s.idxs), -1)
            channel = torch.zeros(group.group.size, dtype=torch.float64).index_add(0, s.root_idxs,
                                                                                    per_row(rows).double().cpu())
            units.index_add_(0, group.channel_unit, channel)
        return units

    def state_dict(self) -> dict[str, Any]:
        return {"accumulators": [a.clone() for a in self.accumulators], "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.accumulators = [a.clone() for a in state["accumulators"]]
        self.steps = int(state["steps"])

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        ours = {id(p) for p in self.params}
        rest = [p for p in model.parameters() if id(p) not in ours]
        return [{"params": rest}, {"params": self.params, "lr_scale": 0.0, "weight_decay": 0.0}]

    def threshold(self, root: str) -> float:
        """``g(n) = c sqrt(gamma) (n gamma)^mu`` of a group, ``gamma`` the peak learning rate."""
        gamma = self.train.lr
        return self.c[root] * math.sqrt(gamma) * (self.steps * gamma) ** self.mu

    @torch.no_grad()
    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        lr = self.train.lr_at(min(1.0, step / self.total))
        self.accumulators = [a.to(p.device) for a, p in zip(self.accumulators, self.params)]  # after fit's .to()
        for param, acc in zip(self.params, self.accumulators):
            if param.grad is not None:
                acc.sub_(lr * param.grad.detach())
        scale: dict[int, list[tuple[Any, torch.Tensor]]] = {}
        for root, group in self.units.groups.items():
            accs = [self.accumulators[self.position[id(p)]] for p, _ in self.slices[root]]
            norms = self._per_unit(root, accs, lambda rows: rows.pow(2).sum(1)).sqrt()
            factor = (1 - self.threshold(root) * self.sizes[root].sqrt() / norms.clamp_min(1e-30)).clamp_min(0)
            for param, s in self.slices[root]:
                scale.setdefault(id(param), []).append((s, factor[group.channel_unit[s.root_idxs]]))
        self.steps += 1  # w_{n+1} is thresholded at g(n)
        for param, acc in zip(self.params, self.accumulators):
            value = acc.clone()
            for s, f in scale.get(id(param), []):
                shape = [1] * value.dim()
                shape[s.dim] = -1
                full = torch.ones(value.shape[s.dim], dtype=value.dtype, device=value.device)
                full[s.idxs.to(value.device)] = f.to(value)
                value.mul_(full.reshape(shape))
            param.copy_(value)

    def per_entry_norms(self) -> dict[str, torch.Tensor]:
        """Per group, each unit's ``||w_u|| / sqrt(d_u)`` over its conv/linear slices."""
        return {root: (self._per_unit(root, [p for p, _ in self.slices[root]], lambda rows: rows.pow(2).sum(1))
                       / self.sizes[root]).sqrt() for root in self.units.groups}

    def epoch_metrics(self, model: nn.Module, epoch: int) -> dict[str, float]:
        zero = sum(int((n == 0).sum()) for n in self.per_entry_norms().values())
        return {"zeroed_units": zero / self.units.total()}

    def choose(self) -> tuple[dict[str, list[int]], int]:
        """Per group, the ``m`` units with the smallest ``||w_u|| / sqrt(d_u)``; and how many of them are zero."""
        out, zero = {}, 0
        for root, per in self.per_entry_norms().items():
            order = torch.argsort(per, stable=True)[:self.units.groups[root].remove]
            out[root] = sorted(order.tolist())
            zero += int((per[order] == 0).sum())
        return out, zero


def _weight_layer(units: GroupUnits, name: str) -> bool:
    """Whether a slice belongs to a conv/linear layer (not a PReLU slope or a free parameter)."""
    module = units.modules.get(name.rpartition(".")[0])
    return isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear))


def calibrated_c(hooks: GRDAHooks, gamma: float, steps: int, mu: float) -> dict[str, float]:
    """Per group, the ``c`` at which the final threshold is a tenth of its ``m``-th smallest ``||w_u|| / sqrt(d_u)``."""
    end = math.sqrt(gamma) * (steps * gamma) ** mu
    out = {}
    for root, per in hooks.per_entry_norms().items():
        out[root] = max(0.1 * float(per.sort().values[hooks.units.groups[root].remove - 1]), 1e-12) / end
    return out


def sdprun_(model: nn.Module, data, config: SDprunConfig, ctx: RunContext) -> PruneRecord:
    """sDprun on ``model`` in place (the ``apply`` of the ``sdprun`` method)."""
    graph = ChannelGraph(model, data.example_inputs(), ignore=config.ignore)
    units = GroupUnits(model, graph, removal_counts(model, graph, data.flops_inputs(), config.target))
    steps_per_epoch = math.ceil(len(data.train) / ctx.train.batch_size)
    hooks = GRDAHooks(units, {}, config.mu, ctx.train, steps_per_epoch, config.epochs)
    hooks.c = {root: config.c for root in units.groups} if config.c else \
        calibrated_c(hooks, ctx.train.lr, hooks.total, config.mu)
    zeroed: list[int] = []

    def choose() -> dict[str, list[int]]:
        removed, zero = hooks.choose()
        zeroed.append(zero)
        return removed

    record, _ = train_then_remove_(model, data, units, hooks, config.epochs, choose, ctx, method=config.method,
                                   bn_images=config.bn_images, finetune_epochs=config.finetune_epochs,
                                   ignore=config.ignore)
    record.results.update(zeroed_by_optimizer=zeroed[0], c=hooks.c, mu=config.mu)
    spread = f"{min(hooks.c.values()):.3g}-{max(hooks.c.values()):.3g}" if len(set(hooks.c.values())) > 1 \
        else f"{next(iter(hooks.c.values())):.3g}"
    before, after = record.results["train_loss_before"], record.results["train_loss_after_training"]
    record.notes.append(f"{config.epochs} epoch(s) of group-thresholded gRDA (c {spread}, mu {config.mu:g}); "
                        f"{zeroed[0]} of the {units.total()} removed units had been set to zero by the optimizer; "
                        f"training loss {before:.4f} before, {after:.4f} at the end of gRDA; "
                        f"{config.finetune_epochs} fine-tune epoch(s) after the removal")
    return record


register(MethodSpec("sdprun", SDprunConfig, sdprun_,
                    "Li et al. 2021, Structured Directional Pruning via Perturbation Orthogonal Projection, "
                    "arXiv 2107.05328",
                    "group-thresholded dual averaging (gRDA) drives whole channels to zero along the flat valley"))
