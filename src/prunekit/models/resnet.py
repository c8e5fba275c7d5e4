"""CIFAR ResNets (He et al. 2016, arXiv 1512.03385): three stages of 6n+2 layers with basic blocks.

``width=4`` on ``resnet32`` gives the wide ResNet-32 of EigenDamage (Wang et al. 2019, arXiv 1905.05934).
"""

from __future__ import annotations

import torch
from torch import nn

from prunekit.models.config import MODELS, ModelConfig, scaled


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            # Projection shortcut (option B): a 1x1 conv keeps the residual add prunable as a group.
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, config: ModelConfig, depth: int) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        blocks = (depth - 2) // 6
        widths = [scaled(16, config.width), scaled(32, config.width), scaled(64, config.width)]
        self.conv1 = nn.Conv2d(config.in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages: list[nn.Module] = []
        in_planes = widths[0]
        for stage, planes in enumerate(widths):
            layers = []
            for i in range(blocks):
                layers.append(BasicBlock(in_planes, planes, 2 if stage > 0 and i == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(in_planes, config.num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.pool(x)))


def _factory(depth: int):
    def build(config: ModelConfig) -> CifarResNet:
        return CifarResNet(config, depth)

    build.__name__ = f"resnet{depth}"
    return build


for _depth in (20, 32, 56):
    MODELS.add(f"resnet{_depth}", _factory(_depth), f"CIFAR ResNet-{_depth} (basic blocks, 16-32-64 x width)")
