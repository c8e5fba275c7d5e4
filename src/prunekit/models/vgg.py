"""VGG with BatchNorm, CIFAR style (Simonyan & Zisserman 2015, arXiv 1409.1556): 3x3 convs, a pooled
global feature, one linear classifier."""

from __future__ import annotations

import torch
from torch import nn

from prunekit.models.config import MODELS, ModelConfig, scaled

_LAYERS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"],
}


class VGG(nn.Module):
    """VGG-BN; a max-pool is skipped once the feature map is 1 pixel wide, so 28x28 and 8x8 inputs work."""

    def __init__(self, config: ModelConfig, layers: list[int | str]) -> None:
        super().__init__()
        modules: list[nn.Module] = []
        channels, side = config.in_channels, config.input_size
        for item in layers:
            if item == "M":
                if side >= 2:
                    modules.append(nn.MaxPool2d(2))
                    side //= 2
                continue
            out = scaled(int(item), config.width)
            modules += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            channels = out
        self.features = nn.Sequential(*modules)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(channels, config.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.pool(self.features(x))))


def _factory(name: str):
    def build(config: ModelConfig) -> VGG:
        return VGG(config, _LAYERS[name])

    build.__name__ = name
    return build


for _name in _LAYERS:
    MODELS.add(_name, _factory(_name), f"{_name.upper()} with BatchNorm, CIFAR style")
