"""benchmarks/latency.py: --quick writes both tables from a measured latency target and its equal-speed FLOPs
twin, resumes from its row cache, and refuses misuse in one line."""

from __future__ import annotations

import json

import pytest

from scripts import run_script


@pytest.mark.slow
def test_quick_run_writes_outputs_and_resumes(tmp_path):
    out = tmp_path / "quick"
    first = run_script("benchmarks/latency.py", "--quick", "--no-progress", "--out", str(out))
    assert first.returncode == 0, first.stderr[-2000:]
    payload = json.loads((out / "latency.json").read_text())
    latency, flops = payload["rows"]
    assert (latency["target"], flops["target"]) == ("latency", "flops")
    assert latency["predicted_speedup"] == pytest.approx(1.25, rel=0.03)
    # the FLOPs row was searched to the latency row's measured speed (within the noise of a 3-step search)
    assert flops["measured_before_finetune"] == pytest.approx(latency["measured_before_finetune"], rel=0.15)
    assert len(flops["search"]) >= 1 and all(0 <= r["test_acc"] <= 1 for r in (latency, flops))
    assert latency["round_to"] in (1, 4, 8, 16)
    assert [r["round_to"] for r in payload["rounding"]] == [1, 8]
    assert list((out / "cache").glob("latency/*.json")), "the latency table is cached beside the rows"
    text = (out / "latency.md").read_text()
    assert "| resnet20 (" in text and "| x1.25 | l2 |" in text and "| eager b64 |" in text
    again = run_script("benchmarks/latency.py", "--quick", "--no-progress", "--out", str(out))
    assert again.returncode == 0 and "test acc" not in again.stdout.split("| model |")[0]  # nothing re-run


def test_misuse_is_refused():
    bad = run_script("benchmarks/latency.py", "--criteria", "l3")
    assert bad.returncode == 2 and "unknown --criteria ['l3']" in bad.stderr
    bad = run_script("benchmarks/latency.py", "--engines", "tensorrt")
    assert bad.returncode == 2 and "invalid choice: 'tensorrt'" in bad.stderr
    bad = run_script("benchmarks/latency.py", "--search-steps", "0")
    assert bad.returncode == 2 and "--search-steps must be >= 1" in bad.stderr
    bad = run_script("benchmarks/latency.py", "--quick", "--latency-grid", "1")  # --quick keeps what was given
    assert bad.returncode == 2 and "grid (--latency-grid) must be an int in [2, 16], got 1" in bad.stderr
