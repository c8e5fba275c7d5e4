"""The model zoo: CIFAR-style networks sized for small images, each built from a :class:`ModelConfig`.

>>> from prunekit.models import create_model, list_models
>>> list_models("resnet*")
['resnet20', 'resnet32', 'resnet56']
>>> create_model("lenet5", num_classes=10, in_channels=1, input_size=28)(__import__("torch").zeros(2, 1, 28, 28)).shape
torch.Size([2, 10])
"""

from __future__ import annotations

from torch import nn

from prunekit.models import lenet, mobilenetv2, resnet, vgg, vit  # noqa: F401  (registers the zoo)
from prunekit.models.config import MODELS, ModelConfig


def list_models(pattern: str = "*") -> list[str]:
    """Zoo names matching a shell-style wildcard (``"vgg*"``)."""
    return MODELS.list(pattern)


def create_model(name: str | ModelConfig, **kwargs) -> nn.Module:
    """Build a zoo model from a name plus :class:`ModelConfig` fields, or from a config.

    Raises:
        ValueError: for an unknown name (the message lists the zoo) or a bad config value.
    """
    config = name if isinstance(name, ModelConfig) else ModelConfig(name=name, **kwargs)
    if kwargs and isinstance(name, ModelConfig):
        raise TypeError("pass either a ModelConfig or a name with keyword arguments, not both")
    return MODELS.get(config.name)(config)


__all__ = ["MODELS", "ModelConfig", "create_model", "list_models"]
