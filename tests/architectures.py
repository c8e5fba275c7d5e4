"""Tiny test architectures, one per kind of channel coupling the engine must get right, and the helpers that
make any model ready for an equivalence test (calibrated BatchNorm, a random pruning plan).

Each entry of :data:`ARCHITECTURES` is ``name -> Arch(factory, input_shape)``: ``factory()`` takes no arguments and
returns a fresh, randomly initialised ``nn.Module`` (seed it yourself); ``input_shape`` excludes the batch.
Channels are 4-16 and inputs 3x8x8 (or similar) so every test runs in well under a second.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from prunekit.channels.graph import ChannelGraph, ChannelPlan

IMAGE = (3, 8, 8)
CLASSES = 5


def conv_bn_relu(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU())


class Head(nn.Module):
    """Global average pooling, flatten, linear classifier (the output layer, never pruned)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(x), 1))


class ResidualAdd(nn.Module):
    """conv-bn-relu stem, then a basic block whose output is added to an identity shortcut."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn_relu(3, 8)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.head = Head(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.head(torch.relu(out + x))


class Concat(nn.Module):
    """Two conv branches of different widths concatenated along channels, then a conv reading both."""

    def __init__(self) -> None:
        super().__init__()
        self.a = conv_bn_relu(3, 4)
        self.b = conv_bn_relu(3, 6, kernel=1)
        self.merge = conv_bn_relu(10, 8)
        self.head = Head(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.merge(torch.cat([self.a(x), self.b(x)], dim=1)))


class Chunk(nn.Module):
    """A conv output split in two halves with ``torch.chunk``; each half feeds its own conv and the results add."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.left = nn.Conv2d(4, 6, 3, padding=1)
        self.right = nn.Conv2d(4, 6, 1)
        self.head = Head(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.chunk(torch.relu(self.stem(x)), 2, dim=1)
        return self.head(torch.relu(self.left(a) + self.right(b)))


class DepthwiseSeparable(nn.Module):
    """Pointwise expansion, 3x3 depthwise conv (groups == channels), pointwise projection."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn_relu(3, 8)
        self.depthwise = conv_bn_relu(8, 8, groups=8)
        self.pointwise = conv_bn_relu(8, 12, kernel=1)
        self.head = Head(12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pointwise(self.depthwise(self.stem(x))))


class GroupedConv(nn.Module):
    """Non-depthwise grouped convolutions (groups=2 then groups=4) between plain convs."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn_relu(3, 8)
        self.g2 = conv_bn_relu(8, 8, groups=2)
        self.g4 = conv_bn_relu(8, 16, groups=4)
        self.out = conv_bn_relu(16, 8, kernel=1)
        self.head = Head(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.out(self.g4(self.g2(self.stem(x)))))


class FlattenLinear(nn.Module):
    """conv -> relu -> flatten straight into a linear layer (no global pooling): each channel owns 16 inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 4, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(4 * 4 * 4, 12)
        self.fc2 = nn.Linear(12, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


class PoolLinear(nn.Module):
    """conv-bn-relu, global average pooling, then a two-layer MLP head."""

    def __init__(self) -> None:
        super().__init__()
        self.features = conv_bn_relu(3, 8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.pool(self.features(x)), 1)
        return self.fc2(torch.relu(self.fc1(x)))


class AttentionBlock(nn.Module):
    """Conv patch embedding -> tokens -> ``nn.MultiheadAttention`` (batch_first) with a residual -> token MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 2, stride=2)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)
        self.head = nn.Linear(8, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = t + self.attn(t, t, t, need_weights=False)[0]
        t = t + self.fc2(torch.relu(self.fc1(t)))
        return self.head(t.mean(1))


class SharedConv(nn.Module):
    """The same in->in conv applied twice in one forward pass (weights shared between the two calls)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.mid = nn.Conv2d(8, 6, 1)
        self.head = Head(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.shared(x))
        x = torch.relu(self.shared(x))
        return self.head(torch.relu(self.mid(x)))


class ChannelScale(nn.Module):
    """A learned per-channel scale ``nn.Parameter`` of shape (1, C, 1, 1) multiplied into a feature map."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.scale = nn.Parameter(torch.rand(1, 8, 1, 1) + 0.5)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.head = Head(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x) * self.scale)
        return self.head(torch.relu(self.conv2(x)))


class PositionalEmbedding(nn.Module):
    """Patch tokens plus a learned positional embedding (1, tokens, C), a token MLP, mean pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 2, stride=2)
        self.pos = nn.Parameter(torch.randn(1, 16, 8) * 0.1)
        self.fc1 = nn.Linear(8, 12)
        self.head = nn.Linear(12, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(torch.relu(self.fc1(t)).mean(1))


class Upsample(nn.Module):
    """A strided conv down, a ConvTranspose2d back up, nearest upsampling, then convs."""

    def __init__(self) -> None:
        super().__init__()
        self.down = conv_bn_relu(3, 8, stride=2)
        self.up = nn.ConvTranspose2d(8, 6, 2, stride=2)
        self.bn = nn.BatchNorm2d(6)
        self.conv = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.last = nn.Conv2d(8, 8, 3, padding=1)
        self.head = Head(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.up(self.down(x))))
        x = self.upsample(torch.relu(self.conv(x)))
        return self.head(torch.relu(self.last(x)))


class InnerBlock(nn.Module):
    """A basic block with a 1x1 conv + BN projection shortcut (8 -> 12 channels)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = conv_bn_relu(cin, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.proj = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn2(self.conv2(self.conv1(x))) + self.proj(x))


class NestedResidual(nn.Module):
    """An outer identity residual around (projection-shortcut block -> 1x1 conv back to the input width)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn_relu(3, 8)
        self.inner = InnerBlock(8, 12)
        self.back = nn.Sequential(nn.Conv2d(12, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.after = conv_bn_relu(8, 10)
        self.head = Head(10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.back(self.inner(x)))
        return self.head(self.after(x))


class MLPLayerNorm(nn.Module):
    """Flattened pixels -> linear -> LayerNorm -> relu -> linear -> relu -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3 * 8 * 8, 16)
        self.norm = nn.LayerNorm(16)
        self.fc2 = nn.Linear(16, 12)
        self.fc3 = nn.Linear(12, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.norm(self.fc1(torch.flatten(x, 1))))
        return self.fc3(torch.relu(self.fc2(x)))


class InstanceNormChain(nn.Module):
    """conv -> BN -> ReLU -> conv -> InstanceNorm (affine) -> ReLU -> conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.inorm = nn.InstanceNorm2d(8, affine=True)
        self.conv3 = nn.Conv2d(8, 6, 3, padding=1)
        self.head = Head(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv1(x)))
        x = torch.relu(self.inorm(self.conv2(x)))
        return self.head(torch.relu(self.conv3(x)))


class Conv1dSequence(nn.Module):
    """1-D convolutions over a sequence with BatchNorm1d and PReLU (one slope per channel)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(4, 8, 3, padding=1)
        self.bn = nn.BatchNorm1d(8)
        self.act = nn.PReLU(8)
        self.conv2 = nn.Conv1d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(self.act(self.bn(self.conv1(x)))))
        return self.fc(x.mean(-1))


@dataclass(frozen=True)
class Arch:
    factory: Callable[[], nn.Module]
    input_shape: tuple[int, ...]


ARCHITECTURES: dict[str, Arch] = {
    "residual_add": Arch(ResidualAdd, IMAGE),
    "concat": Arch(Concat, IMAGE),
    "chunk": Arch(Chunk, IMAGE),
    "depthwise_separable": Arch(DepthwiseSeparable, IMAGE),
    "grouped_conv": Arch(GroupedConv, IMAGE),
    "flatten_linear": Arch(FlattenLinear, IMAGE),
    "pool_linear": Arch(PoolLinear, IMAGE),
    "attention_block": Arch(AttentionBlock, IMAGE),
    "shared_conv": Arch(SharedConv, IMAGE),
    "channel_scale": Arch(ChannelScale, IMAGE),
    "positional_embedding": Arch(PositionalEmbedding, IMAGE),
    "upsample": Arch(Upsample, IMAGE),
    "nested_residual": Arch(NestedResidual, IMAGE),
    "mlp_layernorm": Arch(MLPLayerNorm, IMAGE),
    "instance_norm": Arch(InstanceNormChain, IMAGE),
    "conv1d_sequence": Arch(Conv1dSequence, (4, 16)),
}


# ----------------------------------------------------------------------------------------------------- helpers


@torch.no_grad()
def calibrate_bn_(model: nn.Module, input_shape: tuple[int, ...], batches: int = 3, batch_size: int = 4,
                  seed: int = 0) -> None:
    """Set every BatchNorm's running statistics to the exact average over a few random batches, then ``eval()``.

    Random-init deep networks with default statistics (mean 0, var 1) can output huge values in eval mode; with
    calibrated statistics the outputs are O(1), so an absolute tolerance of 1e-5 means something.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(batches if norms else 0):
        model(torch.randn(batch_size, *input_shape, generator=gen))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.eval()


def random_plan(graph: ChannelGraph, seed: int = 0, fraction: float = 1 / 3) -> ChannelPlan:
    """Remove a random ``fraction`` (at least one, never all) of every prunable group's channels."""
    gen = torch.Generator().manual_seed(seed)
    removed = {}
    for g in graph.groups:
        n = len(g.units)  # tied channels (grouped convs) go together
        if n < 2:
            continue
        k = min(n - 1, max(1, round(fraction * n)))
        removed[g.root] = tuple(c for u in torch.randperm(n, generator=gen)[:k].tolist() for c in g.units[u])
    return ChannelPlan(removed)
