"""MobileNetV2 (Sandler et al. 2018, arXiv 1801.04381), small-input variant: stride 1 in the stem and the
first two downsampling stages, as used for 32x32 CIFAR images; depthwise convs make it a grouped-conv test."""

from __future__ import annotations

import torch
from torch import nn

from prunekit.models.config import MODELS, ModelConfig, scaled

# (expansion t, output channels c, repeats n, stride s) from the paper's Table 2, strides adapted to 32x32.
_SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def _conv_bn(inp: int, out: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(inp, out, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out),
    ]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, out: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = inp * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(_conv_bn(inp, hidden, 1))
        layers += [_conv_bn(hidden, hidden, 3, stride, groups=hidden), _conv_bn(hidden, out, 1, act=False)]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and inp == out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        channels = scaled(32, config.width)
        layers: list[nn.Module] = [_conv_bn(config.in_channels, channels, 3)]
        for t, c, n, s in _SETTINGS:
            out = scaled(c, config.width)
            for i in range(n):
                layers.append(InvertedResidual(channels, out, s if i == 0 else 1, t))
                channels = out
        last = scaled(1280, max(1.0, config.width))
        layers.append(_conv_bn(channels, last, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(last, config.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.pool(self.features(x))))


MODELS.add("mobilenetv2", MobileNetV2, "MobileNetV2, small-input strides (depthwise convs)")
