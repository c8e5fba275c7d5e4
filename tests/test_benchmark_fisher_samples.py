"""benchmarks/fisher_samples.py: --quick measures rank stability against the K-FAC sample size and resumes; misuse
fails."""

from __future__ import annotations

import json

import pytest

from scripts import run_script


@pytest.mark.slow
def test_quick_run_measures_instability_and_cost_and_resumes(tmp_path):
    out = tmp_path / "fisher"
    first = run_script("benchmarks/fisher_samples.py", "--quick", "--out", str(out))
    assert first.returncode == 0, first.stderr[-2000:]
    rows = json.loads((out / "fisher_samples.json").read_text())["rows"]
    assert [r["batches"] for r in rows] == [2, 4]
    for r in rows:
        assert 0 <= r["instability"] <= 1 and r["epochs_cost"] > 0
        assert set(r["ranks"]) == {"seed0", "seed1"} and r["ranks"]["seed0"]  # some layer became a bottleneck
    assert "| 4 | 256 |" in (out / "fisher_samples.md").read_text()
    second = run_script("benchmarks/fisher_samples.py", "--quick", "--out", str(out))
    assert second.returncode == 0 and "batches: instability" not in second.stdout  # every row from the cache


@pytest.mark.parametrize("argv", [["--batches", "0"], ["--flops", "1"], ["--pairs", "0"]])
def test_misuse_is_a_clear_error(tmp_path, argv):
    proc = run_script("benchmarks/fisher_samples.py", "--out", str(tmp_path), *argv)
    assert proc.returncode == 2 and "--batches and --pairs must be >= 1 and --flops in (0, 1)" in proc.stderr
