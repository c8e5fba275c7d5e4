"""DPP's group pattern: learned "k of n filters" masks on coupled channel groups that the structural engine then
removes physically (Gonzalez-Carabarin et al. 2021, arXiv 2105.12686, filter granularity).

In a residual network a filter is not a layer's own: the channels of a residual stage are produced by several
convolutions and BatchNorms whose outputs are added. One learned mask per coupled group (``n`` = the group's
channels, ``k`` kept) therefore multiplies every slice that *produces* a channel: the producing conv/linear rows and
biases and the BatchNorm scale and shift. A dropped channel is then exactly zero wherever it is read, so removing it
afterwards changes no output. Each training step draws one Gumbel top-k mask per group (exactly k-hot forward,
relaxed sequential soft top-k backward, :func:`prunekit.methods.dpp.gumbel_topk_mask`) shared by all its slices;
evaluation uses the top-k of the logits.

``k`` per group follows from a FLOPs, params or channels target with the same fraction of every group removed
(:func:`prunekit.planning.allocation.plan_for_target`, uniform allocation).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from prunekit.channels.graph import ChannelGraph, ChannelGroup, ChannelPlan
from prunekit.methods.dpp import DPPConfig, DPPHooks, gumbel_topk_mask, initial_logits, mask_metrics, topk_mask
from prunekit.methods.group_training import SliceMask, producer_slices
from prunekit.planning.allocation import AllocationConfig, CostModel, Target, plan_for_target


class GroupMask(nn.Module):
    """Learned logits over one coupled group's channels and this step's k-hot draw."""

    def __init__(self, group: ChannelGroup, k: int, config: DPPConfig) -> None:
        super().__init__()
        if not 0 < k < group.size:
            raise ValueError(f"group {group.root} has {group.size} channels: k must be in [1, {group.size - 1}], "
                             f"got {k}")
        self.k, self.config = k, config
        self.temperature, self.noise_scale = config.temperature_at(0), config.noise_at(0)
        norms = group.reduce(lambda s: s.rows().pow(2).sum(1)).sqrt().float()
        self.logits = nn.Parameter(initial_logits(norms, config))
        self._draw: torch.Tensor | None = None

    def entropy(self) -> torch.Tensor:
        return -(torch.softmax(self.logits, -1) * torch.log_softmax(self.logits, -1)).sum()

    def resample(self) -> None:
        """Forget this step's draw (called after every optimizer step)."""
        self._draw = None

    def channel_mask(self) -> torch.Tensor:
        if not self.training:
            return topk_mask(self.logits.detach(), self.k)
        if self._draw is None:
            self._draw = gumbel_topk_mask(self.logits, self.k, self.temperature, self.noise_scale)
        return self._draw


def group_keep_counts(model: nn.Module, graph: ChannelGraph, input_shape: tuple[int, ...],
                      target: Target) -> dict[str, int]:
    """Channels kept per group so that removing the same fraction of every group meets ``target``."""
    scores = {g.root: torch.arange(g.size, dtype=torch.float64) for g in graph.groups}
    plan, _ = plan_for_target(scores, CostModel(model, graph, input_shape), target,
                              AllocationConfig("uniform", max_per_layer=0.95))
    return {g.root: g.size - len(plan.removed.get(g.root, ())) for g in graph.groups}


class _GroupHooks(DPPHooks):
    """DPP's temperature, entropy and metrics, plus one fresh draw per group after every optimizer step."""

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        for g in self.masks.values():
            g.resample()


@dataclass
class GroupDPPResult:
    """The removal plan (replayable architecture change), kept channels per group, per-epoch metrics, history."""

    plan: ChannelPlan
    kept: dict[str, tuple[int, int]]
    metrics: list[dict[str, Any]]
    history: list[dict[str, Any]]


def dpp_filter_prune_(model: nn.Module, data, target: Target, config: DPPConfig, train, *,
                      ignore: tuple[str, ...] = (), progress: bool = True, out_dir: Path | None = None,
                      resume: bool = False, log=None) -> GroupDPPResult:
    """Learn which filters of every coupled group to keep (with the weights) for ``config.epochs`` epochs, then
    remove the rest physically.

    ``config`` supplies the temperature schedule, noise scale, logit initialisation and entropy weight (its ``k``
    and ``n`` are not used: each group's own follow from ``target``). With ``out_dir`` every epoch is committed
    there (the group logits included) and ``resume`` continues a committed run.
    """
    from prunekit.training import fit

    example = data.train[:2][0]
    graph = ChannelGraph(model, example, ignore=ignore)
    if not graph.groups:
        raise ValueError("the DPP group pattern found no prunable channel group in this model")
    keep = group_keep_counts(model, graph, tuple(example.shape[1:]), target)
    masks: dict[str, GroupMask] = {}
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    registered: list[tuple[nn.Module, str]] = []
    for g in graph.groups:
        producers = producer_slices(g)
        if keep[g.root] >= g.size or any(p.name not in params for p in producers):
            continue  # nothing to remove, or a producer that is not a module parameter (left dense)
        masks[g.root] = GroupMask(g, keep[g.root], config)
        for s in producers:
            module_name, _, attr = s.name.rpartition(".")
            parametrize.register_parametrization(modules[module_name], attr, SliceMask(masks[g.root], s))
            registered.append((modules[module_name], attr))
    if not masks:
        raise ValueError(f"the DPP group pattern: target {target} removes no channel from any group")
    holder = nn.ModuleDict({str(i): m for i, m in enumerate(masks.values())})
    model.add_module("_dpp_group_masks", holder)  # so the optimizer trains the logits with the weights
    hooks = _GroupHooks(masks, config)
    resume = resume and out_dir is not None and (Path(out_dir) / "train_state.pt").is_file()
    try:
        history = fit(model, data, replace(train, epochs=config.epochs), out_dir, progress=progress, hooks=hooks,
                      resume=resume, log=log).history
    finally:
        model.eval()
        for g in masks.values():
            g.resample()
        for module, attr in registered:
            if parametrize.is_parametrized(module, attr):
                parametrize.remove_parametrizations(module, attr, leave_parametrized=True)
        del model._dpp_group_masks
    plan = ChannelPlan({r: tuple(torch.nonzero(topk_mask(g.logits.detach(), g.k) == 0).flatten().tolist())
                        for r, g in masks.items()})
    kept = {r: (masks[r].k, masks[r].logits.numel()) for r in masks}
    ChannelGraph(model, example, ignore=ignore).shrink_(plan)
    return GroupDPPResult(plan, kept, mask_metrics(history), history)
