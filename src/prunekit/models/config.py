"""The frozen description of a zoo model; it is what checkpoints store to rebuild the network."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

from torch import nn

from prunekit.configs import Config, config_from_dict
from prunekit.registry import Registry

MODELS: Registry[Callable[[ModelConfig], nn.Module]] = Registry("model")


@dataclass(frozen=True)
class ModelConfig(Config):
    """What a zoo factory needs.

    Args:
        name: Zoo name (``prunekit list models``).
        num_classes: Classifier outputs.
        in_channels: Image channels (1 for Fashion-MNIST, 3 for CIFAR).
        input_size: Image side in pixels (square images).
        width: Width multiplier applied to every hidden layer (wide ResNet-32 of EigenDamage is ``width=4``).
    """

    name: str
    num_classes: int = 10
    in_channels: int = 3
    input_size: int = 32
    width: float = 1.0

    def __post_init__(self) -> None:
        for field in ("num_classes", "in_channels", "input_size"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig.{field} must be a positive int, got {value!r}")
        if self.num_classes < 2:
            raise ValueError(f"ModelConfig.num_classes must be >= 2, got {self.num_classes}")
        if isinstance(self.width, bool) or not isinstance(self.width, (int, float)) or \
                not (self.width > 0 and math.isfinite(self.width)):
            raise ValueError(f"ModelConfig.width must be a positive number, got {self.width!r}")
        if self.name not in MODELS:
            MODELS.get(self.name)  # raises the helpful unknown-name error

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        return config_from_dict(cls, data)


def scaled(channels: int, width: float) -> int:
    """Hidden width ``channels * width`` rounded, never below 1."""
    return max(1, int(round(channels * width)))
