"""BatchNorm re-estimation after pruning: the stored statistics no longer describe the layer inputs once channels or
directions are gone; a few hundred training images bring a pruned network back from chance level without any
training."""

from __future__ import annotations

import torch
from torch import nn

from prunekit.data import DataSplits


@torch.no_grad()
def recalibrate_batchnorm_(model: nn.Module, data: DataSplits, images: int = 512, batch_size: int = 64) -> None:
    """Re-estimate every BatchNorm's running mean/variance on ``images`` training images (the image-weighted
    average of the batch statistics: momentum ``batch / seen``). ``images=0`` leaves them alone."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or images <= 0:
        return
    was_training = model.training
    momenta = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.train()
    device = next(model.parameters()).device
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0))[:images]
    seen = 0
    for start in range(0, len(order), batch_size):
        x, _ = data.train[order[start:start + batch_size]]
        seen += len(x)
        for m in norms:  # momentum = batch / seen: the running mean is the exact per-image average
            m.momentum = len(x) / seen
        model(x.to(device))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.train(was_training)
