"""Shared round-trip helper for prunekit's frozen config dataclasses."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, TypeVar

C = TypeVar("C")


def config_from_dict(cls: type[C], data: Any) -> C:
    """Build ``cls(**data)``, rejecting keys that are not fields with a message listing the accepted ones."""
    if not isinstance(data, dict):
        raise TypeError(f"{cls.__name__}.from_dict expects a dict, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}; accepted: {sorted(known)}")
    return cls(**data)
