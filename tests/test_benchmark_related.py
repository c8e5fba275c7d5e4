"""benchmarks/related.py: --quick writes both tables and resumes from its row cache; misuse is one clear line."""

from __future__ import annotations

import json

import pytest

from scripts import run_script


@pytest.mark.slow
def test_quick_run_writes_outputs_and_resumes(tmp_path):
    out = tmp_path / "quick"
    first = run_script("benchmarks/related.py", "--quick", "--no-progress", "--out", str(out))
    assert first.returncode == 0, first.stderr[-2000:]
    payload = json.loads((out / "related.json").read_text())
    assert [r["method"] for r in payload["rows"]] == ["l1", "l1-uniform", "spp", "increg", "sdprun", "growing-reg"]
    for r in payload["rows"]:
        assert r["flops_reduction"] == pytest.approx(2.0, rel=0.03) and 0 <= r["test_acc"] <= 1
        assert r["budget"] == 2 and r["train_epochs"] == (0 if r["method"].startswith("l1") else 1)
    trained = [r for r in payload["rows"] if not r["method"].startswith("l1")]
    assert all(r["tool_info"]["train_loss_before"] > 0 for r in trained)
    (djpq,) = payload["djpq"]
    assert djpq["compression"] > 1 and djpq["bops"]["end"] < djpq["bops"]["dense_8x8"]
    text = (out / "related.md").read_text()
    assert "| Torch-Pruning GrowingReg |" in text and "| DJPQ, 2 epochs | 0.25 |" in text
    again = run_script("benchmarks/related.py", "--quick", "--no-progress", "--out", str(out))
    assert again.returncode == 0 and "test acc" not in again.stdout.split("| model |")[0]  # nothing re-run


def test_misuse_is_refused():
    bad = run_script("benchmarks/related.py", "--budget", "1", "--train-epochs", "1")
    assert bad.returncode == 2 and "--train-epochs must be in [1, --budget - 1]" in bad.stderr
    bad = run_script("benchmarks/related.py", "--methods", "obd")
    assert bad.returncode == 2 and "unknown --methods ['obd']" in bad.stderr
