"""Frozen config dataclasses that round-trip through dicts, JSON and YAML, in the spirit of torchao's configs.

A config class subclasses :class:`Config` and calls :func:`coerce_fields` first in its ``__post_init__``: every
field is then converted from its plain form (an enum's value, a target's text such as ``"flops=0.5"``, a nested
config's dict, a list for a tuple) into its annotated type, so ``cls.from_dict(cfg.to_dict()) == cfg`` and a YAML
recipe builds the same object as Python code. Unknown keys are refused with the accepted ones listed.

>>> from prunekit.training import TrainConfig
>>> cfg = TrainConfig(epochs=3, schedule="step")
>>> TrainConfig.from_yaml(cfg.to_yaml()) == cfg
True
"""

from __future__ import annotations

import dataclasses
import enum
import json
import re
import types
import typing
from dataclasses import fields
from typing import Any, TypeVar

C = TypeVar("C")


def config_from_dict(cls: type[C], data: Any) -> C:
    """Build ``cls(**data)``, rejecting keys that are not fields with a message listing the accepted ones."""
    if not isinstance(data, dict):
        raise TypeError(f"{cls.__name__}.from_dict expects a dict, got {type(data).__name__}")
    known = {f.name for f in fields(cls) if f.init}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}; accepted: {sorted(known)}")
    return cls(**data)


def plain(value: Any) -> Any:
    """``value`` as JSON-ready data: configs and dataclasses as dicts, enums as values, tuples as lists, and
    anything with a ``to_text`` (a :class:`~prunekit.planning.allocation.Target`) as that text."""
    if hasattr(value, "to_text"):
        return value.to_text()
    if isinstance(value, Config):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    return value


def _options(annotation: Any) -> tuple[list[Any], bool]:
    """The non-None members of a union annotation, and whether None is allowed."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        return members, len(members) < len(typing.get_args(annotation))
    return [annotation], annotation is type(None)


_KIND_NAMES = {bool: "true or false", int: "a whole number", float: "a number", str: "text"}


def _describe(kind: Any) -> str:
    origin = typing.get_origin(kind)
    if kind in _KIND_NAMES:
        return _KIND_NAMES[kind]
    if origin is tuple:
        return "a list"
    if origin is dict:
        return "a mapping of name: value"
    if isinstance(kind, type) and hasattr(kind, "parse"):
        return f"text such as {getattr(kind, 'EXAMPLE', 'flops=0.5')}"
    if isinstance(kind, type) and hasattr(kind, "from_dict"):
        return f"a mapping of {kind.__name__} fields"
    return getattr(kind, "__name__", str(kind))


def _convert(value: Any, annotation: Any, where: str) -> Any:
    """``value`` as the annotated type, or a ValueError naming the field, what it got and what it takes."""
    members, optional = _options(annotation)
    if value is None:
        if optional or annotation is Any:
            return None
        raise ValueError(f"{where} must be {' or '.join(_describe(k) for k in members)}, got nothing (null)")
    for kind in members:
        origin = typing.get_origin(kind)
        if kind is Any:
            return value
        if isinstance(kind, type) and issubclass(kind, enum.Enum):
            if isinstance(value, kind):
                return value
            try:
                return kind(value)
            except ValueError:
                raise ValueError(f"{where} must be one of {[m.value for m in kind]}, got {value!r}") from None
        if isinstance(kind, type) and hasattr(kind, "parse"):
            if isinstance(value, kind):
                return value
            if isinstance(value, str):
                return kind.parse(value)
            if isinstance(value, dict):  # the older {"metric": ..., "keep": ...} form
                return kind(**value)
            continue
        if isinstance(kind, type) and hasattr(kind, "from_dict"):
            if isinstance(value, kind):
                return value
            if isinstance(value, dict):
                return kind.from_dict(value)
            continue
        if origin is tuple:
            if isinstance(value, (list, tuple)):
                args = typing.get_args(kind)
                inner = args[0] if args else Any
                return tuple(_convert(v, inner, f"{where}[{i}]") for i, v in enumerate(value))
            continue
        if origin is dict:
            if isinstance(value, dict):
                args = typing.get_args(kind)
                inner = args[1] if len(args) == 2 else Any
                return {k: _convert(v, inner, f"{where}[{k}]") for k, v in value.items()}
            continue
        if kind is bool:
            if isinstance(value, bool):
                return value
            continue
        if kind is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            continue
        if kind is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return value
            continue
        if kind is str:
            if isinstance(value, str):
                return value
            continue
        return value  # a type this helper does not check
    shown = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
    raise ValueError(f"{where} must be {' or '.join(_describe(k) for k in members)}"
                     f"{' or null' if optional else ''}, got {shown[:60]}")


def coerce_fields(config: Any) -> None:
    """Convert every field of a frozen dataclass in place from its plain form to its annotated type (and to the
    field's ``choices`` metadata, where it names a narrower closed set)."""
    hints = typing.get_type_hints(type(config))
    for f in fields(config):
        if f.name in hints:
            value = getattr(config, f.name)
            where = f"{type(config).__name__}.{f.name}"
            choices = f.metadata.get("choices")
            try:
                converted = _convert(value, hints[f.name], where)
            except ValueError:
                if not choices:
                    raise
                converted = None
            if choices and converted not in choices:  # a closed set narrower than the annotation's
                raise ValueError(f"{where} must be one of {[getattr(c, 'value', c) for c in choices]}, got "
                                 f"{getattr(value, 'value', value)!r}")
            if converted is not value:
                object.__setattr__(config, f.name, converted)


class Config:
    """Mixin of the frozen config dataclasses: dict, JSON and YAML round trips."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: plain(getattr(self, f.name)) for f in fields(self)}  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls: type[C], data: Any) -> C:
        return config_from_dict(cls, data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls: type[C], text: str) -> C:
        return cls.from_dict(json.loads(text))  # type: ignore[attr-defined]

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls: type[C], text: str) -> C:
        import yaml

        return cls.from_dict(yaml.safe_load(text))  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------------- field help and flags


@dataclasses.dataclass(frozen=True)
class FieldInfo:
    """One leaf field of a (nested) config: its dotted path, the flag that sets it, its type and its help."""

    path: tuple[str, ...]
    annotation: Any
    default: Any
    help: str
    flag_name: str | None = None
    choices: tuple[Any, ...] | None = None

    @property
    def flag(self) -> str:
        return self.flag_name or "--" + self.path[-1].replace("_", "-")

    @property
    def dest(self) -> str:
        return "__".join(self.path)


def docstring_args(cls: type) -> dict[str, str]:
    """The ``Args:`` section of a Google-style class docstring: field name -> help text (``a, b: text`` counts
    for both)."""
    doc = cls.__doc__ or ""
    match = re.search(r"^\s*Args:\s*$(.*?)(?:^\s*(?:Returns|Raises|Example|Examples):|\Z)", doc, re.M | re.S)
    if not match:
        return {}
    lines = match.group(1).splitlines()
    indent = min((len(line) - len(line.lstrip()) for line in lines if line.strip()), default=0)
    out: dict[str, list[str]] = {}
    current: list[str] = []
    for line in lines:
        if not line.strip():
            continue
        if len(line) - len(line.lstrip()) == indent and ":" in line:
            names, _, text = line.strip().partition(":")
            current = [text.strip()]
            for name in names.split(","):
                out[name.strip()] = current
        else:
            current.append(line.strip())
    return {name: " ".join(parts) for name, parts in out.items()}


def leaf_fields(cls: type, prefix: tuple[str, ...] = ()) -> list[FieldInfo]:
    """Every settable leaf of ``cls``, nested configs flattened (their fields keep their own names)."""
    hints = typing.get_type_hints(cls)
    helps: dict[str, str] = {}
    for klass in reversed(cls.__mro__):  # a subclass documents its own fields; its bases document theirs
        helps.update(docstring_args(klass))
    out: list[FieldInfo] = []
    for f in fields(cls):
        if not f.init:
            continue
        annotation = hints[f.name]
        members, _ = _options(annotation)
        nested = [m for m in members if isinstance(m, type) and issubclass(m, Config) and not hasattr(m, "parse")]
        if nested:
            out += leaf_fields(nested[0], (*prefix, f.name))
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        out.append(FieldInfo((*prefix, f.name), annotation, default, helps.get(f.name, ""), f.metadata.get("flag"),
                             f.metadata.get("choices")))
    return out


def with_values(cls: type[C], values: dict[tuple[str, ...], Any], base: C | None = None) -> C:
    """A ``cls`` whose leaves at the given paths take the given values (the others from ``base`` or defaults)."""
    data = base.to_dict() if base is not None else {}  # type: ignore[attr-defined]
    for path, value in values.items():
        node = data
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = plain(value)
    return config_from_dict(cls, data)
