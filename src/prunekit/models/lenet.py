"""LeNet-300-100 and LeNet-5 (Caffe's 20-50-500 variant used by ADMM-NN-S, Ma et al. 2019, arXiv 1907.02124)."""

from __future__ import annotations

import torch
from torch import nn

from prunekit.models.config import MODELS, ModelConfig, scaled


class LeNet300(nn.Module):
    """Fully connected 300-100 network on flattened pixels."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        inputs = config.in_channels * config.input_size**2
        h1, h2 = scaled(300, config.width), scaled(100, config.width)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(inputs, h1)
        self.fc2 = nn.Linear(h1, h2)
        self.fc3 = nn.Linear(h2, config.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.flatten(x)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


class LeNet5(nn.Module):
    """conv5(20)-pool-conv5(50)-pool-fc500-fc.

    The convolutions are unpadded, as in the original, when the image is at least 16 pixels wide; smaller
    images (8x8 ``digits``) get padding 2 so the two 5x5 convolutions still fit.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c1, c2, h = scaled(20, config.width), scaled(50, config.width), scaled(500, config.width)
        pad = 0 if config.input_size >= 16 else 2
        self.conv1 = nn.Conv2d(config.in_channels, c1, 5, padding=pad)
        self.conv2 = nn.Conv2d(c1, c2, 5, padding=pad)
        side = config.input_size
        side = (side + 2 * pad - 4) // 2
        side = (side + 2 * pad - 4) // 2
        if side < 1:
            raise ValueError(f"lenet5 needs input_size >= 4, got {config.input_size}")
        self.pool = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(c2 * side * side, h)
        self.fc2 = nn.Linear(h, config.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = torch.relu(self.fc1(self.flatten(x)))
        return self.fc2(x)


MODELS.add("lenet300", LeNet300, "LeNet-300-100 (MLP, 266k params on 28x28)")
MODELS.add("lenet5", LeNet5, "LeNet-5, Caffe 20-50-500 (431k params on 28x28)")
