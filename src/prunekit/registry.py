"""A small name -> factory registry with wildcard discovery (in the spirit of timm's ``list_models``)."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to entries; unknown names raise an error that lists the known ones.

    Args:
        kind: What the entries are ("model", "dataset"), used in error messages.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._help: dict[str, str] = {}

    def register(self, name: str, help: str = "") -> Callable[[T], T]:
        """Decorator that registers ``entry`` under ``name``."""

        def decorator(entry: T) -> T:
            self.add(name, entry, help)
            return entry

        return decorator

    def add(self, name: str, entry: T, help: str = "") -> None:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry
        self._help[name] = help

    def list(self, pattern: str = "*") -> list[str]:
        """Sorted names matching a shell-style wildcard, e.g. ``"resnet*"``."""
        return sorted(n for n in self._entries if fnmatch.fnmatchcase(n, pattern))

    def help(self, name: str) -> str:
        return self._help[self._check(name)]

    def get(self, name: str) -> T:
        return self._entries[self._check(name)]

    def _check(self, name: str) -> str:
        if not isinstance(name, str):
            raise TypeError(f"{self.kind} name must be a str, got {type(name).__name__}")
        if name in self._entries:
            return name
        close = difflib.get_close_matches(name, list(self._entries), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(
            f"unknown {self.kind} {name!r}; known {self.kind}s: {', '.join(self.list())}.{hint}"
        )

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.list())
