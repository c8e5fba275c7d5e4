"""benchmarks/admm.py: --quick writes its table and JSON with every row kind, resumes from the cache, rejects bad
rates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scripts import run_script

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str):
    return run_script("benchmarks/admm.py", *args)


@pytest.mark.slow
def test_quick_run_writes_rows_and_resumes(tmp_path):
    out = tmp_path / "admm"
    first = _run("--quick", "--out", str(out))
    assert first.returncode == 0, first.stderr[-2000:]
    payload = json.loads((out / "admm.json").read_text())["models"]["lenet5"]
    admm, imp = payload["admm"], payload["imp"]
    # the same stages and the same epochs at every rate for both rows
    assert [s["rate"] for s in admm["stages"]] == [s["rate"] for s in imp["stages"]] == [5.0, 10.0]
    assert [s["epochs"] for s in admm["stages"]] == [s["epochs"] for s in imp["stages"]] == [2, 4]
    for stage in admm["stages"] + imp["stages"]:
        assert stage["kept_fraction"] == pytest.approx(1 / stage["rate"], abs=0.01)
        assert stage["storage_bits"][stage["best_format"]] == min(stage["storage_bits"].values())
    assert all(s["converged"] is not None for s in admm["stages"]) and all(s["converged"] is None
                                                                          for s in imp["stages"])
    assert set(admm["residuals"]) == {"stage-1", "stage-2"}
    (quant,) = payload["quant"]
    assert quant["quant"] == "bits=3" and quant["compression"] > admm["stages"][-1]["compression"]
    md = (out / "admm.md").read_text()
    assert "| 10x | 4 |" in md and "| 10x + bits=3 |" in md
    verdict = json.loads((out / "verdict-lenet5" / "compare.json").read_text())
    assert set(verdict["rows"]) == {"dense", "group", "unstructured"}
    group, unstructured = verdict["rows"]["group"], verdict["rows"]["unstructured"]
    assert group["params"] < verdict["rows"]["dense"]["params"] and group["weight_sparsity"] == 0  # shrunk
    assert unstructured["params"] == verdict["rows"]["dense"]["params"] and unstructured["weight_sparsity"] > 0.8
    kept = verdict["variants"]
    assert kept["unstructured"]["kept_fraction"] == pytest.approx(kept["group"]["kept_fraction"], abs=0.01)
    assert (out / "verdict-lenet5" / "compare.png").is_file() and "Smallest storage" in (out / "verdict.md").read_text()
    second = _run("--quick", "--out", str(out))
    assert second.returncode == 0 and ": test acc" not in second.stdout  # all rows cached


@pytest.mark.parametrize("rates", [["0.5"], ["20", "10"]])
def test_bad_rates_are_a_clear_error(tmp_path, rates):
    proc = _run("--rates", *rates, "--out", str(tmp_path))
    assert proc.returncode == 2 and "--rates must rise and be > 1" in proc.stderr
