"""The checkpoint metadata schema: every field a prunekit command reads is checked here, before any is used.

A checkpoint's JSON metadata is user-editable data, so a value of the wrong type must give one line that names the
field, never an ``AttributeError`` deep inside a command. :func:`validate_metadata` checks the fields below and
returns a copy in which ``model`` and ``data`` carry every field with its default filled in.

- ``model``: a zoo :class:`~prunekit.models.ModelConfig` (plus an optional ``input_shape``), or a user factory
  ``{"factory": "package.module:function", "input_shape": [C, H, W]}``, or (the rounds of a Hugging Face job)
  ``{"hf": folder, "class": transformers class name}``.
- ``architecture_changes``: a list of changes, each ``{"kind": "channels", "removed": {layer: [int, ...]},
  "ignore": [layer, ...]}`` or ``{"kind": "eigenbasis", "layers": {layer: {"spec", "rank_in", "rank_out",
  "form"}}}``.
- ``method`` (a registry name) and ``config`` (its config as a dict) of a compressed model;
- ``encoding``: how its weights are stored (``quant``, ``scales``, ``k_of_n``, ``masked_layers``); 0.1 files said
  this in ``admm`` + ``scales`` or ``dpp`` + ``quant``, read into ``encoding`` here;
- ``data`` (:class:`~prunekit.data.DataConfig`), ``train``, ``prune``, ``admm``, ``dpp``: objects;
  ``metrics``: names to numbers; ``scales``: layer names to numbers; ``quant``: text; ``epoch``/``round``: counts;
  ``rounds``: a list of objects; ``dense_sha256``: the hex fingerprint of the dense network a model was pruned from.

Unknown top-level fields are kept and ignored, so newer files still open.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any

from prunekit.persistence.checkpoint import CheckpointError

FACTORY_PATTERN = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class MetadataError(CheckpointError):
    """A checkpoint's metadata has a field of the wrong type or value; the message names the field."""


def _kind(value: Any) -> str:
    return "null" if value is None else {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
                                         int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def _fail(where: str, field: str, expected: str, value: Any) -> MetadataError:
    shown = json.dumps(value) if isinstance(value, (str, int, float, bool, type(None))) else _kind(value)
    return MetadataError(f"{where}: metadata field '{field}' must be {expected}, got {shown[:80]}")


def _is_int(value: Any, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _object(where: str, field: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(where, field, "an object", value)
    return value


def _check_model(where: str, value: Any) -> dict[str, Any]:
    from prunekit.models import ModelConfig

    spec = dict(_object(where, "model", value))
    shape = spec.get("input_shape")
    if shape is not None and not (isinstance(shape, list) and len(shape) == 3 and all(_is_int(v, 1) for v in shape)):
        raise _fail(where, "model.input_shape", "a list of 3 positive ints (C, H, W)", shape)
    if "hf" in spec:  # the round files of a Hugging Face job (its model is the RUN/hf folder)
        if sorted(spec) != ["class", "hf"] or not all(isinstance(spec[k], str) for k in spec) \
                or not spec["class"].isidentifier():
            raise MetadataError(f"{where}: metadata field 'model' of a Hugging Face model holds 'hf' (its folder) "
                                f"and 'class' (a transformers class name) only; got {str(spec)[:160]}")
        return spec
    if "factory" in spec:
        factory = spec["factory"]
        if not isinstance(factory, str) or not FACTORY_PATTERN.match(factory):
            raise _fail(where, "model.factory", "text like package.module:function", factory)
        extra = sorted(set(spec) - {"factory", "input_shape"})
        if extra or shape is None:
            raise MetadataError(f"{where}: metadata field 'model' of a factory holds 'factory' and 'input_shape' "
                                f"only; got fields {sorted(spec)}")
        return spec
    fields = {k: v for k, v in spec.items() if k != "input_shape"}
    try:
        config = ModelConfig.from_dict(fields)
    except (TypeError, ValueError) as exc:
        raise MetadataError(f"{where}: metadata field 'model' is a bad model description ({exc})") from None
    if shape is not None and shape != [config.in_channels, config.input_size, config.input_size]:
        raise _fail(where, "model.input_shape", f"[in_channels, input_size, input_size] = [{config.in_channels}, "
                    f"{config.input_size}, {config.input_size}] for a zoo model", str(shape))
    return {**config.to_dict(), **({"input_shape": shape} if shape is not None else {})}


def _check_channels(where: str, field: str, change: dict[str, Any]) -> None:
    removed = change.get("removed")
    if not isinstance(removed, dict):
        raise _fail(where, f"{field}.removed", "an object of layer name -> channel indices", removed)
    for layer, idxs in removed.items():
        if not isinstance(idxs, list) or not all(_is_int(i) for i in idxs):
            raise _fail(where, f"{field}.removed[{layer}]", "a list of non-negative ints", idxs)
    ignore = change.get("ignore", [])
    if not isinstance(ignore, list) or not all(isinstance(n, str) for n in ignore):
        raise _fail(where, f"{field}.ignore", "a list of layer names", ignore)
    if not isinstance(change.get("residual", False), bool):
        raise _fail(where, f"{field}.residual", "true or false", change.get("residual"))
    attention = change.get("attention", [])
    if not isinstance(attention, list) or not all(isinstance(a, dict) for a in attention):
        raise _fail(where, f"{field}.attention", "a list of attention block descriptions", attention)


_SPEC_PAIRS = ("kernel_size", "stride", "padding", "dilation")


def _check_eigenbasis(where: str, field: str, change: dict[str, Any]) -> None:
    layers = change.get("layers")
    if not isinstance(layers, dict):
        raise _fail(where, f"{field}.layers", "an object of layer name -> bottleneck", layers)
    for layer, entry in layers.items():
        at = f"{field}.layers[{layer}]"
        entry = _object(where, at, entry)
        for key in ("rank_in", "rank_out"):
            if not _is_int(entry.get(key), 1):
                raise _fail(where, f"{at}.{key}", "a positive int", entry.get(key))
        if entry.get("form") not in ("standard", "depthwise"):
            raise _fail(where, f"{at}.form", "'standard' or 'depthwise'", entry.get("form"))
        spec = _object(where, f"{at}.spec", entry.get("spec"))
        if spec.get("kind") not in ("conv", "linear"):
            raise _fail(where, f"{at}.spec.kind", "'conv' or 'linear'", spec.get("kind"))
        for key in ("in_channels", "out_channels"):
            if not _is_int(spec.get(key), 1):
                raise _fail(where, f"{at}.spec.{key}", "a positive int", spec.get(key))
        for key in _SPEC_PAIRS:
            pair = spec.get(key)
            if not (isinstance(pair, list) and len(pair) == 2 and all(_is_int(v) for v in pair)):
                raise _fail(where, f"{at}.spec.{key}", "a list of two non-negative ints", pair)
        if not isinstance(spec.get("bias"), bool):
            raise _fail(where, f"{at}.spec.bias", "true or false", spec.get("bias"))


CHANGE_CHECKS: dict[str, Callable[[str, str, dict[str, Any]], None]] = {
    "channels": _check_channels, "eigenbasis": _check_eigenbasis}


def _check_changes(where: str, value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise _fail(where, "architecture_changes", "a list of changes", value)
    for i, change in enumerate(value):
        field = f"architecture_changes[{i}]"
        change = _object(where, field, change)
        kind = change.get("kind")
        if kind not in CHANGE_CHECKS:
            raise _fail(where, f"{field}.kind", f"one of {sorted(CHANGE_CHECKS)}", kind)
        CHANGE_CHECKS[kind](where, field, change)
    return value


def _check_data(where: str, value: Any) -> dict[str, Any]:
    from prunekit.data import TEXT_TASKS, DataConfig

    try:
        data = _object(where, "data", value)
        if data.get("name") in TEXT_TASKS and "val_pairs" in data:  # a text task's batching (a Hugging Face job)
            from prunekit.retrieval import RetrievalConfig

            return RetrievalConfig.from_dict(data).to_dict()
        return DataConfig.from_dict(data).to_dict()
    except (TypeError, ValueError) as exc:
        raise MetadataError(f"{where}: metadata field 'data' is not a valid dataset description ({exc})") from None


def _numbers(field: str, measured: bool) -> Callable[[str, Any], dict[str, Any]]:
    """An object of numbers; ``measured`` values may also be null or NaN (not measured)."""

    def check(where: str, value: Any) -> dict[str, Any]:
        for key, v in _object(where, field, value).items():
            number = isinstance(v, (int, float)) and not isinstance(v, bool)
            if not ((number and (measured or (math.isfinite(v) and v >= 0))) or (measured and v is None)):
                raise _fail(where, f"{field}.{key}", "a number or null" if measured else "a finite number >= 0",
                            v)
        return value

    return check


def _count(field: str) -> Callable[[str, Any], int]:
    def check(where: str, value: Any) -> int:
        if not _is_int(value):
            raise _fail(where, field, "a non-negative int", value)
        return value

    return check


def _text(field: str, pattern: str | None = None, expected: str = "text") -> Callable[[str, Any], str]:
    def check(where: str, value: Any) -> str:
        if not isinstance(value, str) or (pattern is not None and not re.fullmatch(pattern, value)):
            raise _fail(where, field, expected, value)
        return value

    return check


def _optional_number(field: str) -> Callable[[str, Any], Any]:
    def check(where: str, value: Any) -> Any:
        if value is not None and not _is_number(value):
            raise _fail(where, field, "a finite number or null", value)
        return value

    return check


def _list_of_objects(field: str) -> Callable[[str, Any], list]:
    def check(where: str, value: Any) -> list:
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise _fail(where, field, "a list of objects", value)
        return value

    return check


ROUND_FIELDS = ("round", "target_keep", "predicted_keep", "params", "flops", "removed_channels", "val_acc_pruned",
                "val_acc_finetuned", "seconds_scoring", "seconds_finetune")


def _check_rounds(where: str, value: Any) -> list:
    rounds = _list_of_objects("rounds")(where, value)
    for i, entry in enumerate(rounds):
        if sorted(entry) != sorted(ROUND_FIELDS):
            raise _fail(where, f"rounds[{i}]", f"an object with the fields {', '.join(ROUND_FIELDS)}", _kind(entry))
        for key in ROUND_FIELDS:
            if not (_is_number(entry[key]) or (key == "val_acc_finetuned" and entry[key] is None)):
                raise _fail(where, f"rounds[{i}].{key}", "a number", entry[key])
    return rounds


def _check_quant(where: str, field: str, owner: dict[str, Any]) -> None:
    """``owner["quant"]``, when present, is a quantization's text (``bits=4``)."""
    from prunekit.planning.constraints import QuantConstraint

    if "quant" in owner:
        try:
            QuantConstraint.parse(_text(f"{field}.quant")(where, owner["quant"]))
        except ValueError as exc:
            raise MetadataError(f"{where}: metadata field '{field}.quant' is not a quantization ({exc})") from None


def _check_admm(where: str, value: Any) -> dict[str, Any]:
    admm = _object(where, "admm", value)
    _check_quant(where, "admm", admm)
    return admm


def _check_encoding(where: str, value: Any) -> dict[str, Any]:
    encoding = _object(where, "encoding", value)
    _check_quant(where, "encoding", encoding)
    if "scales" in encoding:
        _numbers("encoding.scales", measured=False)(where, encoding["scales"])
    layers = encoding.get("masked_layers")
    if layers is not None and not (isinstance(layers, list) and all(isinstance(n, str) for n in layers)):
        raise _fail(where, "encoding.masked_layers", "a list of layer names", layers)
    for layer, kn in (encoding.get("k_of_n") or {}).items():
        if not (isinstance(kn, list) and len(kn) == 2 and all(_is_int(v, 1) for v in kn) and kn[0] < kn[1]):
            raise _fail(where, f"encoding.k_of_n[{layer}]", "[k, n] with 1 <= k < n", kn)
    bits = encoding.get("layer_bits")
    if bits is not None:
        if not isinstance(bits, dict) or not all(_is_int(b, 1) and b <= 16 for b in bits.values()):
            raise _fail(where, "encoding.layer_bits", "layer names to code widths of 1 to 16 bits", bits)
        if set(bits) - set(encoding.get("scales") or {}):
            raise _fail(where, "encoding.layer_bits", "layers that also have a scale in encoding.scales",
                        sorted(set(bits) - set(encoding.get("scales") or {})))
    return encoding


def _legacy_encoding(meta: dict[str, Any]) -> dict[str, Any] | None:
    """What 0.1 checkpoints said about their weight encoding (``admm`` + ``scales``, or ``dpp`` + ``quant``), in the
    ``encoding`` form of today's; ``None`` when they said nothing."""
    if isinstance(meta.get("admm"), dict):
        admm = meta["admm"]
        quant = admm.get("quant", "none")
        scales = meta.get("scales") or {}
        encoding: dict[str, Any] = {"quant": quant, "scales": scales}
        if quant != "none":
            encoding["masked_layers"] = list(scales)
        if admm.get("pattern") == "k-of-n" and scales:
            encoding["k_of_n"] = {layer: [admm["k"], admm["n"]] for layer in scales}
        return encoding
    if isinstance(meta.get("dpp"), dict) and isinstance(meta.get("quant"), str):
        return {"quant": meta["quant"]}
    return None


FIELD_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "method": _text("method"),
    "config": lambda where, v: _object(where, "config", v),
    "encoding": _check_encoding,
    "model": _check_model,
    "architecture_changes": _check_changes,
    "data": _check_data,
    "metrics": _numbers("metrics", measured=True),
    "scales": _numbers("scales", measured=False),
    "train": lambda where, v: _object(where, "train", v),
    "prune": lambda where, v: _object(where, "prune", v),
    "dpp": lambda where, v: _object(where, "dpp", v),
    "admm": _check_admm,
    "quant": _text("quant"),
    "epoch": _count("epoch"),
    "round": _count("round"),
    "rounds": _check_rounds,
    "val_acc_before_finetune": _optional_number("val_acc_before_finetune"),
    "test_acc_before_finetune": _optional_number("test_acc_before_finetune"),
    "dense_sha256": _text("dense_sha256", "[0-9a-f]{64}", "64 hex digits"),
}


def validate_metadata(meta: Any, where: str) -> dict[str, Any]:
    """Check ``meta`` against the schema and return it with ``model`` and ``data`` normalised.

    Args:
        meta: The decoded JSON metadata.
        where: The file it came from, for the message.

    Raises:
        MetadataError: the first field that does not fit, named with what it must be.
    """
    if not isinstance(meta, dict):
        raise MetadataError(f"{where}: the metadata must be a JSON object, got {_kind(meta)}")
    checked = dict(meta)
    for field, check in FIELD_CHECKS.items():
        if field in checked:
            checked[field] = check(where, checked[field])
    if "encoding" not in checked:
        legacy = _legacy_encoding(checked)
        if legacy is not None:
            checked["encoding"] = _check_encoding(where, legacy)
    return checked
