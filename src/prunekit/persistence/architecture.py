"""Rebuilding a compressed network without pickle: a base model spec plus a list of architecture changes.

A base spec is either a zoo :class:`~prunekit.models.ModelConfig` or a user factory ``"package.module:function"``
(called with no arguments). Changes are JSON dicts replayed in order on the freshly built base, e.g.
``{"kind": "channels", "removed": {"layer1.0.conv1": [3, 7]}}`` from :class:`~prunekit.channels.graph.ChannelPlan`.

A checkpoint is data: a factory that a file names is imported only when the caller trusts that exact factory
(``trusted_factories``; on the command line ``--trust-factory package.module:function``, or ``prune --model`` with
the same factory), in the spirit of Hugging Face's ``trust_remote_code``. Otherwise loading stops with
:class:`UntrustedCodeError` before anything is imported.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.models import ModelConfig, create_model
from prunekit.persistence.checkpoint import CheckpointError, load_weights_, read_metadata, save_checkpoint


class UntrustedCodeError(CheckpointError):
    """A file names code to import (a model factory) that the caller has not trusted."""


# kind -> function(model, change_dict, example_inputs) that applies the change in place
CHANGE_REPLAYERS: dict[str, Callable[[nn.Module, dict[str, Any], Any], None]] = {}


def _replay_channels(model: nn.Module, change: dict[str, Any], example_inputs: Any) -> None:
    from prunekit.channels.graph import ChannelGraph, ChannelPlan
    from prunekit.channels.heads import AttentionSpec

    plan = ChannelPlan.from_dict(change)
    attention = [AttentionSpec.from_dict(a) for a in change.get("attention", ())]
    ChannelGraph(model, example_inputs, ignore=change.get("ignore", ()), probe=False, attention=attention,
                 residual=bool(change.get("residual", False))).shrink_(plan, verify=False)


def _replay_eigenbasis(model: nn.Module, change: dict[str, Any], example_inputs: torch.Tensor) -> None:
    from prunekit.methods.eigendamage import replay_eigenbasis_

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


def check_factory_trusted(spec: dict[str, Any], trusted_factories: Collection[str], source: str) -> None:
    """Refuse a spec whose factory the caller has not trusted, before anything is imported.

    Raises:
        UntrustedCodeError: naming the module it would import, the function it would call and how to allow it.
    """
    factory = spec.get("factory")
    if factory is None or factory in trusted_factories:
        return
    module, _, function = str(factory).partition(":")
    raise UntrustedCodeError(
        f"{source} asks to import {module!r} and call {function!r} to build its network (model factory "
        f"{factory!r}); prunekit runs no code that a file names. If you trust it, pass --trust-factory {factory} "
        f"(Python: trusted_factories=[{factory!r}])")


def build_base(spec: dict[str, Any], trusted_factories: Collection[str] = (), source: str = "the model spec"
               ) -> nn.Module:
    """Build the network a spec names: ``{"name": ..., ...ModelConfig}`` or ``{"factory": "pkg.mod:fn"}``.

    Args:
        trusted_factories: Factories the caller allows to be imported and called; any other raises
            :class:`UntrustedCodeError` before importing.
        source: Where the spec came from, for that message.
    """
    if "hf" in spec:
        raise ValueError(f"{source} holds a round of a Hugging Face model pruned from {spec['hf']}; the job's "
                         "RUN/hf folder is the model (prunekit.load_pruned)")
    if "factory" in spec:
        check_factory_trusted(spec, trusted_factories, source)
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


def replay_changes_(model: nn.Module, changes: list[dict[str, Any]], input_shape: tuple[int, ...] | Any) -> None:
    """Apply recorded architecture changes to a freshly built base model, in order; ``input_shape`` is one
    example's shape (C, H, W) or example inputs to trace with (a tensor, a tuple or a dict of keyword tensors)."""
    shape = isinstance(input_shape, (tuple, list)) and all(isinstance(v, int) for v in input_shape)
    example = torch.zeros(2, *input_shape) if shape else input_shape
    for i, change in enumerate(changes):
        kind = change.get("kind")
        if kind not in CHANGE_REPLAYERS:
            raise CheckpointError(f"architecture change {i} has unknown kind {kind!r}; known: "
                                  f"{sorted(CHANGE_REPLAYERS)}")
        CHANGE_REPLAYERS[kind](model, change, example)


def changes_within(changes: list[dict[str, Any]], prefix: str) -> list[dict[str, Any]]:
    """Channel and eigenbasis changes recorded on a model, rewritten for its submodule ``prefix``
    (``"encoder.encoder"`` of an ``InBatchRetrieval`` around a Hugging Face encoder): layer names lose the prefix, so
    the submodule can be saved and rebuilt on its own.

    Raises:
        ValueError: a change that is not a channel change, or names a layer outside ``prefix``.
    """
    head = prefix.rstrip(".") + "."

    def inner(name: str) -> str:
        if not name.startswith(head):
            raise ValueError(f"{name!r} is outside {prefix!r}; only changes within it can be saved with it")
        return name[len(head):]

    out = []
    for change in changes:
        if change.get("kind") == "eigenbasis":
            out.append({**change, "layers": {inner(k): v for k, v in change["layers"].items()}})
            continue
        if change.get("kind") != "channels":
            raise ValueError(f"only channel and eigenbasis changes can be moved into a submodule, got "
                             f"{change.get('kind')!r}")
        moved = {**change, "removed": {inner(k): v for k, v in change["removed"].items()}}
        if "ignore" in change:
            moved["ignore"] = [inner(n) for n in change["ignore"] if n.startswith(head)]
        if "attention" in change:
            moved["attention"] = [{**a, **{r: inner(a[r]) for r in ("module", "q", "k", "v", "out")}}
                                  for a in change["attention"]]
        out.append(moved)
    return out


def save_compressed(path: str | Path, model: nn.Module, base: dict[str, Any], changes: list[dict[str, Any]],
                    metadata: dict[str, Any] | None = None) -> Path:
    """Save weights (safetensors) + the base spec and architecture changes (JSON in the header)."""
    return save_checkpoint(path, model, {**(metadata or {}), "model": base, "architecture_changes": changes})


def load_compressed(path: str | Path, trusted_factories: Collection[str] = ()) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the base network, replay its changes and load the weights (no pickle anywhere).

    Works for dense checkpoints too (no changes). Returns (model in eval mode, validated metadata).

    Args:
        trusted_factories: User factories (``"package.module:function"``) this call may import; a checkpoint
            naming any other factory raises :class:`UntrustedCodeError` and nothing is imported.

    Raises:
        CheckpointError: unreadable file, metadata that does not fit the schema (the field is named), changes that
            do not fit the network, or weights that do not fit it.
    """
    meta = read_metadata(path)
    base = meta.get("model")
    if base is None:
        raise CheckpointError(f"{path}: metadata has no 'model' entry, so no model description; "
                                  "cannot rebuild the network")
    check_factory_trusted(base, trusted_factories, str(path))
    try:
        model = build_base(base, trusted_factories, str(path))
        replay_changes_(model, meta.get("architecture_changes", []), input_shape_of(base))
    except CheckpointError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RuntimeError) as exc:
        message = " ".join(str(exc).split())[:300]
        raise CheckpointError(f"{path}: cannot rebuild the network ({exc.__class__.__name__}: {message})") from None
    load_weights_(model, path)
    return model.eval(), meta


def describe_base(spec: dict[str, Any]) -> str:
    """``lenet5 (width 1.0, 10 classes, 1x28x28)`` or the factory's name: what a base spec builds, for messages."""
    if "factory" in spec:
        return f"factory {spec['factory']} on {'x'.join(map(str, input_shape_of(spec)))}"
    return (f"{spec.get('name')} (width {spec.get('width')}, {spec.get('num_classes')} classes, "
            f"{'x'.join(map(str, input_shape_of(spec)))})")


def check_pruned_from(dense: dict[str, Any], pruned: dict[str, Any], dense_source: str, pruned_source: str,
                      dense_model: nn.Module | None = None) -> None:
    """Refuse to compare networks unless ``pruned`` really is ``dense`` after more architecture changes: the same
    base spec, the dense network's changes a prefix of the pruned one's, and, when the pruned file records the
    fingerprint of the network it was pruned from, ``dense_model``'s weights that very network.

    Args:
        dense, pruned: Validated checkpoint metadata (:func:`~prunekit.persistence.checkpoint.read_metadata`).
        dense_model: The loaded dense network, to check against the recorded fingerprint.

    Raises:
        ValueError: naming both files and what each was built from.
    """
    if dense.get("model") != pruned.get("model"):
        raise ValueError(f"{pruned_source} is not pruned from {dense_source}: it was built from "
                         f"{describe_base(pruned['model'])}, the other from {describe_base(dense['model'])}; "
                         "compare a pruned network only with the network it was pruned from")
    before, after = dense.get("architecture_changes", []), pruned.get("architecture_changes", [])
    if after[:len(before)] != before:
        raise ValueError(f"{pruned_source} is not pruned from {dense_source}: both start from "
                         f"{describe_base(dense['model'])}, but {dense_source}'s own architecture changes are not the "
                         f"first of {pruned_source}'s")
    recorded = pruned.get("dense_sha256")
    if recorded and dense_model is not None and not before:
        from prunekit.persistence.checkpoint import state_fingerprint

        if state_fingerprint(dense_model) != recorded:
            raise ValueError(f"{pruned_source} was pruned from another network of the same architecture than "
                             f"{dense_source} (its weights differ from the recorded fingerprint); compare it with "
                             "the checkpoint it was pruned from")
