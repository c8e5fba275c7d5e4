"""Rebuilding a compressed network without pickle: a base model spec plus a list of architecture changes.

A base spec is either a zoo :class:`~prunekit.models.ModelConfig` or a user factory ``"package.module:function"``
(called with no arguments). Changes are JSON dicts replayed in order on the freshly built base, e.g.
``{"kind": "channels", "removed": {"layer1.0.conv1": [3, 7]}}`` from :class:`~prunekit.engine.ChannelPlan`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.checkpoint import CheckpointError, load_weights_, read_metadata, save_checkpoint
from prunekit.models import ModelConfig, create_model

# kind -> function(model, change_dict, example_inputs) that applies the change in place
CHANGE_REPLAYERS: dict[str, Callable[[nn.Module, dict[str, Any], torch.Tensor], None]] = {}


def _replay_channels(model: nn.Module, change: dict[str, Any], example_inputs: torch.Tensor) -> None:
    from prunekit.engine import ChannelGraph, ChannelPlan

    plan = ChannelPlan.from_dict(change)
    ChannelGraph(model, example_inputs, ignore=change.get("ignore", ()), probe=False).shrink_(plan, verify=False)


def _replay_eigenbasis(model: nn.Module, change: dict[str, Any], example_inputs: torch.Tensor) -> None:
    from prunekit.eigendamage import replay_eigenbasis_

    replay_eigenbasis_(model, change, example_inputs)


CHANGE_REPLAYERS["channels"] = _replay_channels
CHANGE_REPLAYERS["eigenbasis"] = _replay_eigenbasis


def load_factory(spec: str) -> Callable[[], nn.Module]:
    """Import ``"package.module:function"``.

    Raises:
        ValueError: malformed spec, missing module or attribute.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"a model factory must look like package.module:function, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import {module_name!r} for model factory {spec!r}: {exc}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"{module_name!r} has no callable {attr!r} (model factory {spec!r})")
    return factory


def build_base(spec: dict[str, Any]) -> nn.Module:
    """Build the network a spec names: ``{"name": ..., ...ModelConfig}`` or ``{"factory": "pkg.mod:fn"}``."""
    if "factory" in spec:
        model = load_factory(spec["factory"])()
        if not isinstance(model, nn.Module):
            raise ValueError(f"model factory {spec['factory']!r} returned {type(model).__name__}, not an nn.Module")
        return model
    return create_model(ModelConfig.from_dict({k: v for k, v in spec.items() if k != "input_shape"}))


def input_shape_of(spec: dict[str, Any]) -> tuple[int, ...]:
    """Shape of one example (C, H, W) for a base spec."""
    if "input_shape" in spec:
        return tuple(int(v) for v in spec["input_shape"])
    return (spec["in_channels"], spec["input_size"], spec["input_size"])


def replay_changes_(model: nn.Module, changes: list[dict[str, Any]], input_shape: tuple[int, ...]) -> None:
    """Apply recorded architecture changes to a freshly built base model, in order."""
    example = torch.zeros(2, *input_shape)
    for i, change in enumerate(changes):
        kind = change.get("kind")
        if kind not in CHANGE_REPLAYERS:
            raise CheckpointError(f"architecture change {i} has unknown kind {kind!r}; known: "
                                  f"{sorted(CHANGE_REPLAYERS)}")
        CHANGE_REPLAYERS[kind](model, change, example)


def save_compressed(path: str | Path, model: nn.Module, base: dict[str, Any], changes: list[dict[str, Any]],
                    metadata: dict[str, Any] | None = None) -> Path:
    """Save weights (safetensors) + the base spec and architecture changes (JSON in the header)."""
    return save_checkpoint(path, model, {**(metadata or {}), "model": base, "architecture_changes": changes})


def load_compressed(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the base network, replay its changes and load the weights (no pickle anywhere).

    Works for dense checkpoints too (no changes). Returns (model in eval mode, metadata).
    """
    meta = read_metadata(path)
    base = meta.get("model")
    if not isinstance(base, dict):
        raise CheckpointError(f"{path}: metadata has no model description; cannot rebuild the network")
    try:
        model = build_base(base)
        replay_changes_(model, meta.get("architecture_changes", []), input_shape_of(base))
    except CheckpointError:
        raise
    except (ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(f"{path}: cannot rebuild the network ({exc})") from None
    load_weights_(model, path)
    return model.eval(), meta
