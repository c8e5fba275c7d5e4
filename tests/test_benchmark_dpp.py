"""benchmarks/dpp.py: --quick compares DPP with magnitude k-of-n at the same pattern and resumes; misuse fails."""

from __future__ import annotations

import json

import pytest

from scripts import run_script


@pytest.mark.slow
def test_quick_run_compares_both_methods_at_the_same_sparsity(tmp_path):
    out = tmp_path / "dpp"
    first = run_script("benchmarks/dpp.py", "--quick", "--out", str(out))
    assert first.returncode == 0, first.stderr[-2000:]
    rows = json.loads((out / "dpp.json").read_text())["models"]["lenet5"]["rows"]
    assert [r["method"] for r in rows] == ["magnitude", "dpp", "dpp-authors"]
    assert rows[0]["k_of_n"] == rows[1]["k_of_n"] == rows[2]["k_of_n"]  # the same pattern for all
    assert rows[0]["sparsity"] == pytest.approx(rows[1]["sparsity"], abs=0.01)
    assert 0.7 < rows[1]["sparsity"] < 0.8
    assert "| 75% | none |" in (out / "dpp.md").read_text()
    assert rows[1]["metrics"] and "![mask confidence and diversity](lenet5_mask_metrics.png)" in \
        (out / "dpp.md").read_text()
    assert (out / "lenet5_mask_metrics.png").read_bytes()[:4] == b"\x89PNG"
    filters = json.loads((out / "dpp.json").read_text())["filter"]["lenet5"]["tuned"]
    assert 3.5 < filters["flops_reduction"] < 4.5 and filters["params_reduction"] > 1  # shrunk physically
    assert "| DPP filter (coupled groups) |" in (out / "dpp.md").read_text()
    assert "| DPP filter, the authors' recipe |" in (out / "dpp.md").read_text()
    second = run_script("benchmarks/dpp.py", "--quick", "--out", str(out))
    assert second.returncode == 0 and "test acc" not in second.stdout.split("# DPP")[0]  # rows from the cache


@pytest.mark.parametrize("argv, message", [(["--sparsities", "0.5"], "--sparsities must be among"),
                                           (["--noise-scale", "-1"], "must be >= 0"),
                                           (["--quant", "octal"], "--quant takes none, binary or bits=N"),
                                           (["--layer-plan", "even"], "invalid choice")])
def test_misuse_is_a_clear_error(tmp_path, argv, message):
    proc = run_script("benchmarks/dpp.py", "--out", str(tmp_path), *argv)
    assert proc.returncode == 2 and message in proc.stderr
