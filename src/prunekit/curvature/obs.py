"""Hessian-based channel criteria in parameter coordinates: C-OBD, C-OBS, Kron-OBD, Kron-OBS.

The structured extensions of Optimal Brain Damage (LeCun et al. 1990) and Optimal Brain Surgeon (Hassibi & Stork
1993) that EigenDamage (Wang et al. 2019, arXiv 1905.05934) compares against. Around a trained minimum the loss
change of a perturbation ``d`` of a layer's weight matrix ``W`` is ``1/2 vec(d)^T F vec(d)``, with ``F`` the
Fisher block of the layer: its diagonal (:func:`~prunekit.curvature.kfac.collect_diagonal_fisher`) or its Kronecker
factors ``G kron A`` (:func:`~prunekit.curvature.kfac.collect_kfac`). Removing channel ``c`` removes rows ``I`` of the
layer that produces it and columns ``J`` of every layer that reads it; a coupled group's saliency sums over all
its members (norm layers carry no curvature statistics and add nothing):

* C-OBD: ``1/2 sum_{q in removed entries} F_qq w_q^2``;
* C-OBS: ``1/2 sum_q w_q^2 / [F^-1]_qq`` with ``[F^-1]_(ij) = [G^-1]_ii [A^-1]_jj``; removal is compensated by the
  sum of the single-weight OBS updates ``dW = -G^-1 C A^-1``, ``C_ij = w_ij / [F^-1]_(ij)`` on removed entries;
* Kron-OBD: rows ``1/2 tr(G_II W_I A W_I^T)`` (``1/2 G_ii w_i^T A w_i`` for one output channel), columns
  ``1/2 tr(A_JJ W_J^T G W_J)``;
* Kron-OBS: rows ``1/2 tr([G^-1]_II^-1 W_I A W_I^T)`` (``w_i^T A w_i / (2 [G^-1]_ii)``), columns likewise with
  ``A^-1``; the remaining rows are corrected by ``dW = -G^-1[:, I] [G^-1]_II^-1 W_I`` (columns:
  ``-W_J [A^-1]_JJ^-1 A^-1[J, :]``), per channel and summed (``obs_update="individual"``) or for all removed
  channels of a layer at once (``"joint"``, the exact minimiser of the quadratic model).

OBS criteria use the damped factors (:meth:`~prunekit.curvature.kfac.KroneckerFactors.damped`); the inverses exist for
any damping > 0.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from prunekit.channels.criteria import CRITERIA, Criterion
from prunekit.channels.graph import ChannelGraph, ChannelGroup, ChannelPlan, SliceKind
from prunekit.curvature.kfac import (
    ConvFactor,
    CurvatureConfig,
    KroneckerFactors,
    collect_diagonal_fisher,
    collect_kfac,
    kfac_support,
)


@dataclass
class _Entries:
    """For one member layer: the rows (out) or columns (in) of its weight matrix each group channel removes."""

    layer: str
    axis: int  # 0 rows, 1 columns
    by_channel: dict[int, list[int]]


def _member_entries(group: ChannelGroup, layers: dict[str, nn.Module], kernel: dict[str, int]) -> list[_Entries]:
    out = []
    for m in group.members:
        module = layers.get(m.name)
        if module is None:
            continue
        for s in m.slices:
            if s.param is not module.weight:
                continue
            axis = 0 if m.kind is SliceKind.OUT else 1
            k = kernel[m.name] if axis == 1 else 1
            by_channel: dict[int, list[int]] = {}
            for idx, root in zip(s.idxs.tolist(), s.root_idxs.tolist()):
                by_channel.setdefault(root, []).extend(range(idx * k, (idx + 1) * k))
            out.append(_Entries(m.name, axis, by_channel))
    return out


class CurvatureCriterion(Criterion):
    """Shared machinery: curvature statistics for every K-FAC-supported layer that a group touches."""

    needs_data = True
    uses_kfac = True

    def __init__(self, config: CurvatureConfig = CurvatureConfig()) -> None:
        self.config = config
        self.layers: dict[str, nn.Module] = {}
        self.factors: dict[str, KroneckerFactors] = {}
        self.kernel: dict[str, int] = {}
        self._cache: dict[str, dict[str, torch.Tensor]] = {}
        self._weights: dict[str, torch.Tensor] = {}

    def prepare(self, model: nn.Module, graph: ChannelGraph, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
                ) -> None:
        modules = dict(model.named_modules())
        names = {m.name for g in graph.groups for m in g.members
                 if m.name in modules and kfac_support(modules[m.name]) is None}
        self.layers = {n: modules[n] for n in sorted(names)}
        self.kernel = {n: (m.kernel_size[0] * m.kernel_size[1] if isinstance(m, nn.Conv2d) else 1)
                       for n, m in self.layers.items()}
        self._cache, self._weights = {}, {}
        self._collect(model, list(batches))

    def _collect(self, model: nn.Module, batches: list) -> None:
        self.factors = collect_kfac(model, batches, self.config, self.layers,
                                    conv_factor=ConvFactor.PATCHES)

    def __call__(self, group: ChannelGroup) -> torch.Tensor:
        entries = _member_entries(group, self.layers, self.kernel)
        if not entries:
            raise ValueError(f"criterion {self.name}: group {group.describe()} has no Linear/Conv2d layer with "
                             "curvature statistics (grouped convolutions have none); use a magnitude criterion or "
                             f"leave {group.root} alone with ignore=[...]")
        scores = torch.zeros(group.size, dtype=torch.float64)
        for e in entries:
            if e.layer not in self._stats_layers():
                continue
            for channel, idx in e.by_channel.items():
                scores[channel] += self.saliency(e.layer, e.axis, idx)
        return scores

    def _stats_layers(self) -> Iterable[str]:
        return self.factors

    def weight(self, layer: str) -> torch.Tensor:
        """The weight matrix of ``layer`` in the factors' layout (float64, bias as the last column)."""
        if layer not in self._weights:
            self._weights[layer] = self._weight_matrix(layer)
        return self._weights[layer]

    def _weight_matrix(self, layer: str) -> torch.Tensor:
        return self.factors[layer].weight_matrix(self.layers[layer])

    def saliency(self, layer: str, axis: int, idx: list[int]) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def _removed_entries(self, graph: ChannelGraph, plan: ChannelPlan) -> dict[tuple[str, int], list[list[int]]]:
        """(layer, axis) -> removed entry sets, one per removed channel."""
        out: dict[tuple[str, int], list[list[int]]] = {}
        for g in graph.groups:
            removed = plan.removed.get(g.root, ())
            if not removed:
                continue
            for e in _member_entries(g, self.layers, self.kernel):
                if e.layer in self.factors:
                    out.setdefault((e.layer, e.axis), []).extend(e.by_channel[c] for c in removed
                                                                  if c in e.by_channel)
        return out

    @torch.no_grad()
    def _apply_delta_(self, layer: str, delta: torch.Tensor) -> None:
        module = self.layers[layer]
        f = self.factors[layer]
        self._weights.pop(layer, None)
        if f.has_bias:
            module.bias.add_(delta[:, -1].to(module.bias))
            delta = delta[:, :-1]
        module.weight.add_(delta.reshape(module.weight.shape).to(module.weight))


def _block_inverse_times(inv: torch.Tensor, sets: list[list[int]], rhs: torch.Tensor, joint: bool) -> torch.Tensor:
    """``sum_u E_u [inv]_{U_u U_u}^-1 rhs[U_u]`` with all sets merged into one when ``joint`` (rows of rhs
    indexed by the entries); the result has rhs's shape, zero outside the sets."""
    out = torch.zeros_like(rhs)
    groups = [sorted({i for s in sets for i in s})] if joint else sets
    for s in groups:
        if s:
            ix = torch.as_tensor(s)
            out[ix] += torch.linalg.solve(inv[ix][:, ix], rhs[ix])
    return out


class KronOBD(CurvatureCriterion):
    """Kron-OBD: ``1/2 G_ii w_i^T A w_i`` per removed row (the diagonal-in-channels quadratic model)."""

    name = "kron-obd"

    def saliency(self, layer: str, axis: int, idx: list[int]) -> float:
        f, w = self.factors[layer], self.weight(layer)
        ix = torch.as_tensor(idx)
        if axis == 0:
            wi = w[ix]
            return 0.5 * float((f.G[ix][:, ix] * (wi @ f.A @ wi.T)).sum())
        wj = w[:, ix]
        return 0.5 * float((f.A[ix][:, ix] * (wj.T @ f.G @ wj)).sum())


class KronOBS(CurvatureCriterion):
    """Kron-OBS: ``w_i^T A w_i / (2 [G^-1]_ii)`` per removed row, with the OBS correction of the others."""

    name = "kron-obs"

    def _inverses(self, layer: str) -> dict[str, torch.Tensor]:
        if layer not in self._cache:
            A, G = self.factors[layer].damped(self.config.damping, self.config.damping_mode)
            self._cache[layer] = {"A": A, "G": G, "A_inv": torch.linalg.inv(A), "G_inv": torch.linalg.inv(G)}
        return self._cache[layer]

    def saliency(self, layer: str, axis: int, idx: list[int]) -> float:
        c, w = self._inverses(layer), self.weight(layer)
        ix = torch.as_tensor(idx)
        if axis == 0:
            wi = w[ix]
            return 0.5 * float(torch.trace(torch.linalg.solve(c["G_inv"][ix][:, ix], wi @ c["A"] @ wi.T)))
        wj = w[:, ix]
        return 0.5 * float(torch.trace(torch.linalg.solve(c["A_inv"][ix][:, ix], wj.T @ c["G"] @ wj)))

    def update_weights_(self, graph: ChannelGraph, plan: ChannelPlan) -> None:
        if self.config.obs_update == "none":
            return
        joint = self.config.obs_update == "joint"
        for (layer, axis), sets in self._removed_entries(graph, plan).items():
            c, w = self._inverses(layer), self.weight(layer)
            if axis == 0:
                delta = -c["G_inv"] @ _block_inverse_times(c["G_inv"], sets, w, joint)
            else:
                delta = -(c["A_inv"] @ _block_inverse_times(c["A_inv"], sets, w.T, joint)).T
            self._apply_delta_(layer, delta)


class COBS(KronOBS):
    """C-OBS: single-weight OBS saliencies ``w_q^2 / (2 [G^-1]_ii [A^-1]_jj)`` summed over the channel, with the
    summed single-weight corrections ``-G^-1 C A^-1``."""

    name = "c-obs"

    def _inverse_diagonal(self, layer: str) -> torch.Tensor:
        c = self._inverses(layer)
        if "diag" not in c:
            c["diag"] = torch.outer(c["G_inv"].diagonal(), c["A_inv"].diagonal())
        return c["diag"]

    def saliency(self, layer: str, axis: int, idx: list[int]) -> float:
        w, d = self.weight(layer), self._inverse_diagonal(layer)
        ix = torch.as_tensor(idx)
        sel = (w[ix] ** 2 / d[ix]) if axis == 0 else (w[:, ix] ** 2 / d[:, ix])
        return 0.5 * float(sel.sum())

    def update_weights_(self, graph: ChannelGraph, plan: ChannelPlan) -> None:
        if self.config.obs_update == "none":
            return
        for (layer, axis), sets in self._removed_entries(graph, plan).items():
            c, w, d = self._inverses(layer), self.weight(layer), self._inverse_diagonal(layer)
            removed = torch.zeros_like(w, dtype=torch.bool)
            ix = torch.as_tensor(sorted({i for s in sets for i in s}))
            if axis == 0:
                removed[ix] = True
            else:
                removed[:, ix] = True
            coeff = torch.where(removed, w / d, torch.zeros_like(w))
            self._apply_delta_(layer, -c["G_inv"] @ coeff @ c["A_inv"])


class COBD(CurvatureCriterion):
    """C-OBD: ``1/2 sum_q F_qq w_q^2`` over the channel's weights, with the exact diagonal Fisher."""

    name = "c-obd"

    def _collect(self, model: nn.Module, batches: list) -> None:
        self.diagonal = collect_diagonal_fisher(model, batches, self.config, self.layers)
        self.factors = {}

    def _stats_layers(self) -> Iterable[str]:
        return self.diagonal

    def _weight_matrix(self, layer: str) -> torch.Tensor:
        module = self.layers[layer]
        w = module.weight.detach().double().cpu().reshape(module.weight.shape[0], -1)
        if module.bias is not None:
            w = torch.cat([w, module.bias.detach().double().cpu()[:, None]], 1)
        return w

    def saliency(self, layer: str, axis: int, idx: list[int]) -> float:
        w, d = self.weight(layer), self.diagonal[layer]
        ix = torch.as_tensor(idx)
        return 0.5 * float(((w ** 2) * d).index_select(axis, ix).sum())


CURVATURE_CRITERIA = {"c-obd": COBD, "c-obs": COBS, "kron-obd": KronOBD, "kron-obs": KronOBS}
CRITERIA.add("c-obd", COBD, "diagonal-Fisher OBD summed over the channel (EigenDamage's C-OBD baseline)")
CRITERIA.add("c-obs", COBS, "single-weight K-FAC OBS summed over the channel, with correction (C-OBS)")
CRITERIA.add("kron-obd", KronOBD, "Kronecker-factored OBD: 1/2 G_ii w_i^T A w_i (Kron-OBD)")
CRITERIA.add("kron-obs", KronOBS, "Kronecker-factored OBS with weight correction (Kron-OBS)")
