"""The registry of compression methods, filled in by the method modules (structural, curvature, ADMM, DPP)."""

from __future__ import annotations

from collections.abc import Callable

from prunekit.registry import Registry

METHODS: Registry[Callable] = Registry("method")
