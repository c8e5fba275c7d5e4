"""Hugging Face ``transformers`` models in and out, without pickle and without the hub.

Since transformers 5 a model class no longer removes heads itself (``prune_heads`` and the config's
``pruned_heads`` are gone), so a pruned model cannot be described by its ``config.json`` alone. A pruned folder
therefore holds:

* ``config.json`` -- the unpruned model's configuration (``model.config.save_pretrained``);
* ``model.safetensors`` -- the pruned weights;
* ``prunekit.json`` -- prunekit's record: the ``transformers`` class, the architecture changes (removed heads and
  FFN neurons, as channel plans) and the example inputs' names, dtypes and shapes needed to replay them.

:func:`load_pruned` builds the same class from the config (random weights, no download), replays the record
through the channel engine and loads the weights, so a new process gets identical outputs. Only classes of the
``transformers`` package itself are built; a folder that asks for remote code (``auto_map``) is refused.

``transformers`` is an optional dependency (``pip install prunekit[hf]``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.persistence.architecture import CHANGE_REPLAYERS
from prunekit.persistence.checkpoint import CheckpointError, atomic_folder

RECORD = "prunekit.json"
WEIGHTS = "model.safetensors"
FORMAT = "prunekit.hf/1"


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError("Hugging Face models need the transformers package: pip install 'prunekit[hf]'") from None
    return transformers


def _model_class(name: Any, source: str):
    """The ``transformers`` model class called ``name`` (never anything outside the package)."""
    transformers = _transformers()
    cls = getattr(transformers, name, None) if isinstance(name, str) and name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise CheckpointError(f"{source}: {name!r} is not a model class of transformers {transformers.__version__}")
    return cls


def _read_config(folder: Path):
    transformers = _transformers()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: not a Hugging Face model folder")
    raw = json.loads((folder / "config.json").read_text())
    if raw.get("auto_map"):
        raise CheckpointError(f"{folder}/config.json asks for remote code (auto_map {sorted(raw['auto_map'])}); "
                              "prunekit only builds classes of the transformers package")
    return transformers.AutoConfig.from_pretrained(folder, local_files_only=True)


def load_pretrained(path: str | Path) -> nn.Module:
    """A ``transformers`` model from a local folder (``from_pretrained`` with no hub access), in eval mode.

    The class is the config's first ``architectures`` entry, looked up in ``transformers`` itself.

    Raises:
        FileNotFoundError: no such folder or no ``config.json`` in it.
        CheckpointError: the config names no model class of ``transformers``, or asks for remote code.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"no Hugging Face model folder at {folder}")
    config = _read_config(folder)
    names = getattr(config, "architectures", None) or []
    if not names:
        raise CheckpointError(f"{folder}/config.json names no architectures; load the model yourself and pass the "
                              "object")
    cls = _model_class(names[0], str(folder))
    from transformers.utils import logging

    shown = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()  # a bar per load would break the CLI's one-line errors and clutter logs
    try:
        return cls.from_pretrained(folder, local_files_only=True).eval()
    finally:
        if shown:
            logging.enable_progress_bar()


def describe_inputs(example_inputs: Mapping[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """Names, dtypes and shapes of keyword example inputs (what replaying the record traces with)."""
    if not isinstance(example_inputs, Mapping) or not example_inputs:
        raise TypeError("a Hugging Face model's example inputs are a dict of keyword tensors (input_ids, "
                        f"attention_mask, pixel_values, ...), got {type(example_inputs).__name__}")
    out = {}
    for name, t in example_inputs.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"example input {name!r} is a {type(t).__name__}, not a tensor")
        out[name] = {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
    return out


def placeholder_inputs(described: Mapping[str, Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """Inputs of the described names, dtypes and shapes: zeros for token ids, ones for masks, fixed noise for
    floats (replay only traces them)."""
    gen = torch.Generator().manual_seed(0)
    out = {}
    for name, d in described.items():
        dtype = getattr(torch, str(d["dtype"]), None)
        if not isinstance(dtype, torch.dtype):
            raise CheckpointError(f"{RECORD}: input {name!r} has unknown dtype {d['dtype']!r}")
        shape = [int(v) for v in d["shape"]]
        if dtype.is_floating_point:
            out[name] = torch.randn(shape, generator=gen).to(dtype)
        else:
            out[name] = (torch.ones if "mask" in name else torch.zeros)(shape, dtype=dtype)
    return out


def save_pruned(model: nn.Module, folder: str | Path, changes: Sequence[dict[str, Any]],
                example_inputs: Mapping[str, torch.Tensor], overwrite: bool = False, tokenizer: Any = None) -> Path:
    """Save a pruned ``transformers`` model: its original config, the pruned weights (safetensors, in the model's
    dtype) and the record of ``changes`` (``PruneRecord.changes``, or ``[graph.change(plan), ...]`` for each
    shrink), with ``tokenizer``'s files when given, all written in a temporary folder that replaces ``folder`` in
    one step.

    Raises:
        FileExistsError: ``folder`` exists and is not empty, without ``overwrite``.
        TypeError: ``model`` is not a ``transformers`` model.
    """
    transformers = _transformers()
    if not isinstance(model, transformers.PreTrainedModel):
        raise TypeError(f"save_pruned takes a transformers model, got {type(model).__name__}")
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise FileExistsError(f"{folder} exists and is not empty; pick a new folder or pass overwrite=True")
    from safetensors.torch import save_model

    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    record = {"format": FORMAT, "class": type(model).__name__, "transformers": transformers.__version__,
              "dtype": dtype, "inputs": describe_inputs(example_inputs), "architecture_changes": list(changes)}

    def write(tmp: Path) -> None:
        model.config.save_pretrained(tmp)
        save_model(model, str(tmp / WEIGHTS))
        (tmp / RECORD).write_text(json.dumps(record, indent=1))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    return atomic_folder(folder, write)


def load_pruned(folder: str | Path) -> nn.Module:
    """Rebuild a folder written by :func:`save_pruned`: the same ``transformers`` class from its config, the
    recorded changes replayed, the weights loaded (strictly). Eval mode.

    Raises:
        FileNotFoundError: a file of the folder is missing.
        CheckpointError: a record or weights that do not fit the model.
    """
    folder = Path(folder)
    if not (folder / RECORD).is_file():
        raise FileNotFoundError(f"{folder} has no {RECORD}: not a pruned model saved by prunekit (a plain Hugging "
                                "Face folder loads with load_pretrained)")
    try:
        record = json.loads((folder / RECORD).read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{folder / RECORD} is not JSON: {exc}") from None
    found = record.get("format") if isinstance(record, dict) else None
    if found != FORMAT:
        raise CheckpointError(f"{folder / RECORD}: format {found!r} is not {FORMAT!r}")
    changes = record.get("architecture_changes")
    if not isinstance(changes, list) or not all(isinstance(c, dict) for c in changes):
        raise CheckpointError(f"{folder / RECORD}: architecture_changes must be a list of objects")
    cls = _model_class(record.get("class"), str(folder / RECORD))
    dtype = getattr(torch, str(record.get("dtype", "float32")), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise CheckpointError(f"{folder / RECORD}: dtype {record.get('dtype')!r} is not a floating-point dtype")
    inputs = record.get("inputs")
    if not (isinstance(inputs, dict) and inputs and all(
            isinstance(d, dict) and isinstance(d.get("dtype"), str) and isinstance(d.get("shape"), list)
            and all(isinstance(v, int) and v > 0 for v in d["shape"]) for d in inputs.values())):
        raise CheckpointError(f"{folder / RECORD}: inputs must map each input name to its dtype and shape, got "
                              f"{str(inputs)[:120]}")
    config = _read_config(folder)
    model = cls(config).to(dtype).eval()
    example = placeholder_inputs(inputs)
    for i, change in enumerate(changes):
        kind = change.get("kind")
        if kind not in CHANGE_REPLAYERS:
            raise CheckpointError(f"{folder / RECORD}: change {i} has unknown kind {kind!r}; known: "
                                  f"{sorted(CHANGE_REPLAYERS)}")
        try:
            CHANGE_REPLAYERS[kind](model, change, example)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, RuntimeError) as exc:
            raise CheckpointError(f"{folder / RECORD}: change {i} does not fit {cls.__name__}: {exc}") from None
    if not (folder / WEIGHTS).is_file():
        raise FileNotFoundError(f"{folder} has no {WEIGHTS}")
    from safetensors.torch import load_model

    try:
        load_model(model, str(folder / WEIGHTS), strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{folder / WEIGHTS} does not fit the rebuilt {cls.__name__}: "
                              f"{' '.join(str(exc).split())[:300]}") from None
    return model.eval()
