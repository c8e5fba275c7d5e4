"""Simulated ``kill -9`` for the resume tests: a forked child runs a job with ``os.replace`` (the commit step of
every atomic write) patched to end the process with ``os._exit`` just before or just after its k-th call, so no
clean-up handler runs and a temporary is left behind when the kill comes before the rename."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

KILLED = 113


def run_killed(job: Callable[[], Any], kill_at: int, after: bool = True) -> int:
    """Run ``job()`` in a forked child that dies at its ``kill_at``-th ``os.replace``; returns the exit status
    (:data:`KILLED` when the kill came, 1 when the job failed, 0 when it finished first)."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            real, calls = os.replace, [0]

            def replace(src, dst):
                calls[0] += 1
                if calls[0] == kill_at and not after:
                    os._exit(KILLED)
                real(src, dst)
                if calls[0] == kill_at:
                    os._exit(KILLED)

            os.replace = replace
            job()
        except BaseException:  # noqa: BLE001 - any failure in the child is reported by its exit status
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def counting_replaces(job: Callable[[], Any]) -> tuple[Any, int]:
    """``(job(), how many atomic writes it committed)``."""
    real, calls = os.replace, [0]

    def replace(src, dst):
        calls[0] += 1
        real(src, dst)

    os.replace = replace
    try:
        return job(), calls[0]
    finally:
        os.replace = real
