"""Channel importance criteria: each maps a :class:`~prunekit.channels.graph.ChannelGroup` to one score per channel
(low scores are removed first). A coupled group's score sums over all its members.

Criteria that need data (first-order Taylor) gather it in :meth:`Criterion.prepare`; the curvature criteria of
:mod:`prunekit.curvature.kfac` plug into the same interface.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.channels.graph import ChannelGraph, ChannelGroup, ChannelPlan
from prunekit.channels.model_io import call_model, to_device
from prunekit.registry import Registry


class Criterion:
    """Base class: ``criterion(group) -> scores`` of shape ``(group.size,)``, float64 on CPU."""

    name = "criterion"
    needs_data = False

    def prepare(self, model: nn.Module, graph: ChannelGraph, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
                ) -> None:
        """Gather whatever statistics the scores need (no-op for data-free criteria)."""

    def update_weights_(self, graph: ChannelGraph, plan: ChannelPlan) -> None:
        """Adjust the weights that stay before ``plan`` is applied (OBS-style compensation); no-op by default."""

    def __call__(self, group: ChannelGroup) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


CRITERIA: Registry[Callable[[], Criterion]] = Registry("criterion")


class Magnitude(Criterion):
    """L1 or L2 norm of every weight slice the channel removes (Li et al. 2017, arXiv 1608.08710):
    ``s_c = sum_{members} sum |w|`` (L1) or ``s_c = sqrt(sum_{members} sum w^2)`` (L2); norm layers excluded."""

    def __init__(self, p: int = 1) -> None:
        if p not in (1, 2):
            raise ValueError(f"magnitude norm p must be 1 or 2, got {p!r}")
        self.p = p
        self.name = f"l{p}"

    def __call__(self, group: ChannelGroup) -> torch.Tensor:
        if self.p == 1:
            return group.reduce(lambda s: s.rows().abs().sum(1))
        return group.reduce(lambda s: s.rows().pow(2).sum(1)).sqrt()


class BNScale(Criterion):
    """Network slimming (Liu et al. 2017, arXiv 1708.06519): ``s_c = sum_{norm layers} |gamma_c|``."""

    name = "bn"

    def __call__(self, group: ChannelGroup) -> torch.Tensor:
        gammas = [s for s in group.slices(include_norm=True) if s.is_norm and s.name.endswith(".weight")]
        if not gammas:
            raise ValueError(
                f"the bn criterion needs a BatchNorm scale in every pruned group; {group.root} has none. "
                "Use l1/l2/taylor, or leave the layer alone with ignore=[...]")
        scores = torch.zeros(group.size, dtype=torch.float64)
        for s in gammas:
            scores.index_add_(0, s.root_idxs, s.rows().abs().sum(1).double())
        return scores


class Taylor(Criterion):
    """First-order Taylor importance (Molchanov et al. 2019, arXiv 1906.10771): per batch,
    ``I_c = (sum_{s in channel c's parameters} g_s w_s)^2``, averaged over batches (norm layers included)."""

    name = "taylor"
    needs_data = True

    def __init__(self) -> None:
        self.scores: dict[str, torch.Tensor] = {}

    def prepare(self, model: nn.Module, graph: ChannelGraph, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
                ) -> None:
        was_training = model.training
        model.eval()  # BN statistics are not updated by scoring
        device = next(model.parameters()).device
        totals = {g.root: torch.zeros(g.size, dtype=torch.float64) for g in graph.groups}
        n = 0
        for x, y in batches:
            model.zero_grad(set_to_none=True)
            F.cross_entropy(call_model(model, to_device(x, device)), y.to(device)).backward()
            for g in graph.groups:
                gw = torch.zeros(g.size, dtype=torch.float64)
                for s in g.slices(include_norm=True):
                    if s.param.grad is None:
                        continue
                    gw.index_add_(0, s.root_idxs, (s.rows() * s.rows(s.param.grad)).sum(1).double().cpu())
                totals[g.root] += gw.pow(2)
            n += 1
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        if n == 0:
            raise ValueError("the taylor criterion needs at least one batch of data")
        self.scores = {k: v / n for k, v in totals.items()}

    def __call__(self, group: ChannelGroup) -> torch.Tensor:
        if group.root not in self.scores:
            raise RuntimeError(f"taylor scores for {group.root} were not prepared; call prepare() with data first")
        return self.scores[group.root]


class RandomScores(Criterion):
    """Uniform random scores: the control every criterion should beat."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, group: ChannelGroup) -> torch.Tensor:
        return torch.rand(group.size, generator=self.generator, dtype=torch.float64)


CRITERIA.add("l1", lambda: Magnitude(1), "L1 norm of the channel's weights (Li et al. 2017)")
CRITERIA.add("l2", lambda: Magnitude(2), "L2 norm of the channel's weights")
CRITERIA.add("bn", BNScale, "|BatchNorm scale| (network slimming, Liu et al. 2017)")
CRITERIA.add("taylor", Taylor, "first-order Taylor (w * grad)^2 (Molchanov et al. 2019)")
CRITERIA.add("random", RandomScores, "random scores (a control)")


def score_groups(criterion: Criterion, graph: ChannelGraph) -> dict[str, torch.Tensor]:
    """Scores of every group of ``graph``, checked for shape and finiteness."""
    scores = {}
    for g in graph.groups:
        s = criterion(g)
        if s.shape != (g.size,):
            raise ValueError(f"criterion {criterion.name} returned shape {tuple(s.shape)} for {g.root}, "
                             f"expected ({g.size},)")
        if not torch.isfinite(s).all():
            raise ValueError(f"criterion {criterion.name} gave non-finite scores for {g.root}; check the model "
                             "weights and the statistics it was prepared with")
        scores[g.root] = s.double().cpu()
    return scores
