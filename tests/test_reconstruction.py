"""Layer-wise least-squares reconstruction: the ridge optimum (checked by autograd through the real layer), masks
kept, shrinking exact afterwards, closer to the unpruned network than without it, and bad input refused."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from prunekit.channels.graph import ChannelGraph, ChannelPlan
from prunekit.methods.channel import L1Config
from prunekit.methods.registry import RunContext, prune_
from prunekit.planning.allocation import Target
from prunekit.recovery.reconstruction import reconstruct_, refittable_layers
from prunekit.training import TrainConfig, fit
from test_pruning import small_resnet


def _images(n: int = 96, shape=(3, 6, 6), seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, *shape, generator=g), torch.zeros(n, dtype=torch.long))


@pytest.mark.parametrize("bias", [True, False])
def test_refit_is_the_ridge_least_squares_optimum_of_the_real_convolution(bias):
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 4, 3, stride=2, bias=bias))
    model = copy.deepcopy(reference)
    with torch.no_grad():
        model[0].weight[1:3] = 0  # two channels of the first layer removed (masked form)
        model[0].bias[1:3] = 0
    data = _images()
    masks = {"0.weight": torch.ones_like(model[0].weight), "0.bias": torch.ones_like(model[0].bias)}
    masks["0.weight"][1:3] = 0
    masks["0.bias"][1:3] = 0
    before = [p.detach().double().clone() for p in model[2].parameters()]
    done = reconstruct_(model, reference, data, count=96, damping=1e-3, masks=masks)
    assert done == ["0", "2"]
    assert model[0].weight[1:3].abs().max() == 0 and model[0].bias[1:3].abs().max() == 0
    # oracle: the gradient of the ridge objective, written with F.conv2d in float64, vanishes at the solution
    x = data.tensors[0].double()
    inputs = F.relu(F.conv2d(x, model[0].weight.double(), model[0].bias.double(), padding=1))
    target = reference.double()(x)
    w = model[2].weight.detach().double().requires_grad_()
    b = model[2].bias.detach().double().requires_grad_() if bias else None
    cols = F.unfold(inputs, 3, stride=2)
    if bias:
        cols = torch.cat([cols, torch.ones_like(cols[:, :1])], dim=1)
    ridge = 1e-3 * (cols.transpose(1, 2).reshape(-1, cols.shape[1]) ** 2).sum(0).mean()
    params = [w] + ([b] if bias else [])
    pull = sum(((p - p0) ** 2).sum() for p, p0 in zip(params, before))  # the ridge pulls toward the old weights
    loss = ((F.conv2d(inputs, w, b, stride=2) - target) ** 2).sum() + ridge * pull
    grads = torch.autograd.grad(loss, params)
    zero = torch.zeros_like(w, requires_grad=True)
    scale = torch.autograd.grad(((F.conv2d(inputs, zero, None, stride=2) - target) ** 2).sum(), [zero])[0]
    assert max(g.abs().max() for g in grads) < 1e-5 * scale.abs().max()  # float32 weights: ~1e-7 relative


def test_linear_layers_refit_and_an_unpruned_network_is_left_as_it_was():
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))
    model = copy.deepcopy(reference)
    data = _images(64, (3, 2, 2))
    reconstruct_(model, reference, data, count=64, damping=1e-9)
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_an_input_the_calibration_images_never_excite_keeps_its_weight():
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Flatten(), nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    model = copy.deepcopy(reference)
    with torch.no_grad():
        model[1].weight[0].mul_(0.5)  # a perturbed first layer gives the second something to re-fit
    data = _images(64, (6, 1, 1))
    data.tensors[0][:, 5] = 0  # feature 5 is never seen in the calibration images
    before = model[1].weight[:, 5].clone()
    reconstruct_(model, reference, data, count=64, damping=1e-3)
    torch.testing.assert_close(model[1].weight[:, :5], reference[1].weight[:, :5], atol=1e-3, rtol=1e-3)  # re-fit
    assert model[1].weight[:, 5].abs().min() > 0
    torch.testing.assert_close(model[1].weight[:, 5], before)  # no data on it: the fit leaves it where it was


def test_execution_order_is_the_forward_order_and_grouped_convolutions_are_left_alone():
    model = nn.Sequential(nn.Conv2d(2, 4, 1), nn.Conv2d(4, 4, 3, groups=2, padding=1), nn.Conv2d(4, 2, 1),
                          nn.Flatten(), nn.Linear(2 * 5 * 5, 3))
    assert refittable_layers(model, torch.randn(2, 2, 5, 5)) == ["0", "2", "4"]


def test_pruning_with_refit_shrinks_exactly_and_lands_closer_to_the_unpruned_network(synthetic):
    dense, base = small_resnet(synthetic)
    fit(dense, synthetic, TrainConfig(epochs=1, lr=0.05), progress=False)
    x = synthetic.val.tensors[0]
    with torch.no_grad():
        want = dense.eval()(x)
    errors = {}
    for images in (0, 256):
        config = L1Config(target="flops=0.3", reconstruction_images=images, bn_images=0)
        pruned = copy.deepcopy(dense)
        prune_(pruned, config, synthetic, RunContext(base=base, log=lambda *_: None))  # in place
        with torch.no_grad():
            errors[images] = (pruned.eval()(x) - want).pow(2).mean().item()
    assert errors[256] < 0.5 * errors[0]


def test_masked_refit_then_shrink_matches_the_masked_network(synthetic):
    dense, _ = small_resnet(synthetic)
    model = copy.deepcopy(dense)
    graph = ChannelGraph(model, synthetic.train[:2][0])
    plan = ChannelPlan({g.root: [0, 1] for g in graph.groups[:3]})
    graph.apply_masks_(plan)
    reconstruct_(model, dense, synthetic.train, count=64, masks=graph.masks(plan))
    masked = copy.deepcopy(model).eval()
    graph.shrink_(plan)  # verifies the shrunk outputs against the masked ones (raises on a mismatch)
    x = synthetic.val.tensors[0][:8]
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), masked(x), atol=1e-5, rtol=1e-5)


def test_bad_input_is_refused():
    layer = nn.Linear(2, 2)
    data = _images(4, (2,))
    with pytest.raises(ValueError, match="count must be >= 1"):
        reconstruct_(layer, layer, data, count=0)
    with pytest.raises(ValueError, match="damping must be > 0"):
        reconstruct_(layer, layer, data, damping=0.0)
    with pytest.raises(ValueError, match="reconstruction_images must be an int >= 0"):
        L1Config(target=Target("flops", 0.5), reconstruction_images=-1)
