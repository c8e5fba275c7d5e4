"""Running the repository's scripts (benchmarks) in a subprocess, as a user would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_script(script: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python <script> <args>`` from the repository root, output captured."""
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
