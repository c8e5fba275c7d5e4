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
    kinds = [(r["kind"], r["quant"]) for r in payload["rows"]]
    assert kinds == [("admm", "none"), ("imp", "none"), ("admm", "bits=3"), ("admm", "binary")]
    for r in payload["rows"]:
        assert r["kept_fraction"] == pytest.approx(0.1, abs=0.01)
        assert r["storage_bits"][r["best_format"]] == min(r["storage_bits"].values())
    quantized = {r["quant"]: r["compression"] for r in payload["rows"] if r["kind"] == "admm"}
    assert quantized["binary"] > quantized["bits=3"] > quantized["none"]  # fewer bits per kept weight
    assert "| admm | 10x | bits=3 |" in (out / "admm.md").read_text()
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


def test_bad_rate_is_a_clear_error(tmp_path):
    proc = _run("--rates", "0.5", "--out", str(tmp_path))
    assert proc.returncode == 2 and "--rates must be > 1" in proc.stderr
