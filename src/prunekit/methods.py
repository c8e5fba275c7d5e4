"""The registry of compression methods a user can name with ``--method``.

Structural criteria (channel groups scored, then removed physically) come from :mod:`prunekit.criteria`.
"""

from __future__ import annotations

from collections.abc import Callable

from prunekit.criteria import CRITERIA
from prunekit.registry import Registry

METHODS: Registry[Callable] = Registry("method")
for _name in CRITERIA.list():
    METHODS.add(_name, CRITERIA.get(_name), f"structural: {CRITERIA.help(_name)}")
