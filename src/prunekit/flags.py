"""Command-line flags generated from a method's config dataclass: one flag per leaf field (nested configs
flattened), typed from the annotation, documented from the docstring's ``Args:``. ``prunekit prune METHOD --help``
therefore shows exactly the flags that method reads, and any other flag is refused.

Only the flags a user gives are set; every other field keeps the config's default, so the command line, Python and
a YAML recipe build the same config.
"""

from __future__ import annotations

import argparse
import enum
import re
import typing
from typing import Any

from prunekit.configs import FieldInfo, _options, leaf_fields, with_values

_PREFIX = "cfg__"


def _kind(info: FieldInfo) -> tuple[Any, bool]:
    members, optional = _options(info.annotation)
    return members[0], optional


def _number(kind: type, flag: str):
    def parse(text: str):
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'a whole number' if kind is int else 'a number'}, got "
                                             f"{text!r}") from None

    parse.__name__ = kind.__name__
    return parse


def _plain(text: str) -> str:
    """Docstring markup made terminal text: ``:class:`X``` and ````x```` become ``X`` and ``x``."""
    text = re.sub(r":[a-z]+:`~?(?:[\w.]+\.)?([\w]+)`", r"\1", text)
    return text.replace("``", "").replace("%", "%%")


def _name_value(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    try:
        if not sep or not name:
            raise ValueError
        return name, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=FRACTION (e.g. fc1=0.2), got {text!r}") from None


def add_config_flags(parser: argparse.ArgumentParser, config: type) -> list[FieldInfo]:
    """Add one flag per leaf field of ``config`` to ``parser``; a ``target`` field may be repeated (one run per
    target). Returns the fields, for :func:`configs_from_args`."""
    infos = leaf_fields(config)
    seen: dict[str, str] = {}
    group = parser.add_argument_group(f"{config.__name__} (the method's settings)")
    for info in infos:
        if info.flag in seen:
            raise ValueError(f"{config.__name__}: fields {seen[info.flag]} and {'.'.join(info.path)} both make "
                             f"the flag {info.flag}")
        seen[info.flag] = ".".join(info.path)
        kind, optional = _kind(info)
        origin = typing.get_origin(kind)
        default = getattr(info.default, "value", info.default)
        text = info.help + (f" (default: {default})" if default not in (None, (), {}) else "")
        dest = _PREFIX + info.dest
        kwargs: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS, "help": _plain(text)}
        if kind is bool:
            if info.default is True:
                flag = "--no-" + info.flag[2:]
                kwargs["help"] = _plain(f"Turn off: {info.help}")
                group.add_argument(flag, action="store_false", **kwargs)
                seen[flag] = seen.pop(info.flag)
                info_flag = flag
            else:
                group.add_argument(info.flag, action="store_true", **kwargs)
                info_flag = info.flag
            object.__setattr__(info, "flag_name", info_flag)
            continue
        if not (isinstance(kind, type) and issubclass(kind, enum.Enum)):
            kwargs["metavar"] = info.path[-1].upper()
        if isinstance(kind, type) and issubclass(kind, enum.Enum):
            kwargs["choices"] = [m.value for m in (info.choices or kind)]
        elif info.path[-1] == "target":
            kwargs.update(action="append", metavar="METRIC=KEEP")
            kwargs["help"] += "; repeat for one run per target"
        elif kind in (int, float):
            kwargs["type"] = _number(kind, info.flag)
        elif origin is tuple:
            inner = (typing.get_args(kind) or (str,))[0]
            kwargs.update(nargs="*" if inner is str or info.default == () else "+",
                          type=_number(inner, info.flag) if inner in (int, float) else str)
        elif origin is dict:
            kwargs.update(nargs="+", type=_name_value, metavar="NAME=FRACTION")
        group.add_argument(info.flag, **kwargs)
    return infos


def configs_from_args(config: type, infos: list[FieldInfo], args: argparse.Namespace) -> list[Any]:
    """The configs the given flags describe: one per ``--target`` (or one with the default target).

    Raises:
        ValueError: a value the config refuses (its message names the field).
    """
    values: dict[tuple[str, ...], Any] = {}
    targets: list[str] | None = None
    for info in infos:
        dest = _PREFIX + info.dest
        if not hasattr(args, dest):
            continue
        value = getattr(args, dest)
        if info.path[-1] == "target":
            targets = value
            continue
        if typing.get_origin(_kind(info)[0]) is dict:
            names = [name for name, _ in value]
            twice = sorted({name for name in names if names.count(name) > 1})
            if twice:
                raise ValueError(f"{info.flag} names {twice[0]} twice; give each layer once")
            value = dict(value)
        values[info.path] = value
    if targets is None:
        return [with_values(config, values)]
    target_path = next(info.path for info in infos if info.path[-1] == "target")
    return [with_values(config, {**values, target_path: t}) for t in targets]


def flags_of(config: type) -> list[str]:
    """The flags :func:`add_config_flags` makes for ``config``."""
    parser = argparse.ArgumentParser(add_help=False)
    return [info.flag for info in add_config_flags(parser, config)]
