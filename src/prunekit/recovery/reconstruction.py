"""Layer-wise least-squares reconstruction: recovering a channel-pruned network without fine-tuning.

After channels are removed, every layer that reads a thinned feature map computes something else than before.
Channel Pruning (He, Zhang & Sun 2017, arXiv 1707.06168) and ThiNet (Luo, Wu & Lin 2017, arXiv 1707.06342)
re-fit those weights by linear least squares so that the layer's output matches the unpruned network's:

    W' = argmin ||X_p W'^T - X_d W^T||^2 + lambda ||W' - W_0||^2
       =>  W'^T = (X_p^T X_p + lambda I)^-1 (X_p^T X_d W^T + lambda W_0^T)

with X_p the layer's inputs in the pruned network (im2col patches for a convolution) and X_d the unpruned network's
inputs to the same layer on the same images. The ridge pulls toward the layer's weights before the fit, W_0
(not toward zero as in the papers): an input never active on the calibration images keeps its weight instead of
being silently zeroed, and a removed input (zero column, zero weight in the masked form) stays exactly zero.

prunekit re-fits every convolution (``groups=1``) and linear layer in execution order, each on the inputs
produced by the layers already corrected before it, so errors do not pile up along the depth. Pre-activation
outputs then match the unpruned ones, so the old BatchNorm statistics of the kept channels stay valid;
BatchNorm re-estimation afterwards still runs as usual.

The fit works on the *masked* network (removed slices zeroed, shapes kept), so every layer keeps its name and shape
and pairs with the reference by name; the caller shrinks afterwards.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm


class _Stop(Exception):
    """Raised by a capture hook to end a forward pass once the wanted layer's input is seen."""


def refittable_layers(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the convolutions (``groups=1``, zero padding) and linear layers, in the order a forward pass
    first calls them."""
    order: list[str] = []
    handles = []
    for name, m in model.named_modules():
        ok = isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros")
        if ok:
            handles.append(m.register_forward_pre_hook(
                lambda _m, _i, name=name: order.append(name) if name not in order else None))
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return order


def _layer_input(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input ``layer`` receives when ``model`` runs on ``x`` (the forward stops there)."""
    box: list[torch.Tensor] = []

    def hook(_m, inputs):
        box.append(inputs[0])
        raise _Stop

    handle = layer.register_forward_pre_hook(hook)
    try:
        model(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not box:
        raise RuntimeError("the layer was not called in the forward pass")
    return box[0]


def _features(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Rows of the least-squares problem: im2col patches (conv) or input vectors (linear), plus a 1 for the bias."""
    if isinstance(layer, nn.Conv2d):
        cols = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride)
        rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    else:
        rows = x.reshape(-1, x.shape[-1])
    rows = rows.double()
    if layer.bias is not None:
        rows = torch.cat([rows, rows.new_ones(len(rows), 1)], dim=1)
    return rows


def _flat_weight(layer: nn.Module) -> torch.Tensor:
    w = layer.weight.detach().reshape(layer.weight.shape[0], -1).double()
    if layer.bias is not None:
        w = torch.cat([w, layer.bias.detach().double()[:, None]], dim=1)
    return w


@torch.no_grad()
def reconstruct_(
    model: nn.Module,
    reference: nn.Module,
    images: TensorDataset,
    count: int = 256,
    batch_size: int = 64,
    damping: float = 1e-3,
    masks: dict[str, torch.Tensor] | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> list[str]:
    """Re-fit the conv/linear weights of ``model`` so each layer's output matches ``reference``'s, in place.

    Args:
        model: The pruned network in masked form (same module names and shapes as ``reference``).
        reference: The network before pruning (not modified).
        images: A dataset whose first tensor holds the inputs; ``count`` of them are drawn (seed 0).
        damping: Ridge term toward the current weights, relative to the mean diagonal of X_p^T X_p.
        masks: Per parameter name, 0/1 tensors of slices that must stay zero (``ChannelGraph.masks``).

    Returns:
        The names of the layers re-fitted, in order.

    Raises:
        ValueError: ``count`` < 1 or ``damping`` <= 0.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1 image, got {count!r}")
    if not damping > 0:
        raise ValueError(f"damping must be > 0 (it holds unexcited inputs in place), got {damping!r}")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:count]
    device = next(model.parameters()).device
    batches = [images[order[i:i + batch_size]][0].to(device) for i in range(0, len(order), batch_size)]
    modules, ref_modules = dict(model.named_modules()), dict(reference.named_modules())
    params = dict(model.named_parameters())
    masks = masks or {}
    was_training, ref_training = model.training, reference.training
    model.eval()
    reference.eval()
    done: list[str] = []
    try:
        for name in tqdm(refittable_layers(model, batches[0]), desc="reconstruct", leave=False,
                         disable=not progress):
            layer, ref_layer = modules[name], ref_modules.get(name)
            if ref_layer is None or ref_layer.weight.shape != layer.weight.shape or \
                    (ref_layer.bias is None) != (layer.bias is None):
                continue
            gram = cross = None
            for x in batches:
                xp = _features(layer, _layer_input(model, layer, x))
                xd = _features(ref_layer, _layer_input(reference, ref_layer, x))
                gram = xp.T @ xp if gram is None else gram.add_(xp.T @ xp)
                cross = xp.T @ xd if cross is None else cross.add_(xp.T @ xd)
            ridge = damping * max(gram.diagonal().mean().item(), 1e-12)
            gram.diagonal().add_(ridge)
            rhs = cross @ _flat_weight(ref_layer).T + ridge * _flat_weight(layer).T
            solved = torch.linalg.solve(gram, rhs).T  # (out, in [+1])
            if not torch.isfinite(solved).all():
                continue  # keep the weights rather than write NaNs
            if layer.bias is not None:
                layer.bias.copy_(solved[:, -1].to(layer.bias.dtype))
                solved = solved[:, :-1]
            layer.weight.copy_(solved.reshape(layer.weight.shape).to(layer.weight.dtype))
            for pname in (f"{name}.weight", f"{name}.bias"):
                if pname in masks:
                    params[pname].mul_(masks[pname].to(params[pname]))
            done.append(name)
    finally:
        model.train(was_training)
        reference.train(ref_training)
    if log is not None:
        log(f"reconstruction: re-fitted {len(done)} layers on {len(order)} images")
    return done
