"""benchmarks/deploy.py: --quick writes accuracy-before/after and latency-vs-limit rows, re-times from the saved
model with --remeasure-latency, and rejects bad factors."""

from __future__ import annotations

import json

import pytest

from scripts import run_script


def _run(*args: str):
    return run_script("benchmarks/deploy.py", *args)


@pytest.mark.slow
def test_quick_run_writes_rows_and_remeasures_latency_only(tmp_path):
    out = tmp_path / "deploy"
    first = _run("--quick", "--out", str(out))
    assert first.returncode == 0, first.stderr[-2000:]
    payload = json.loads((out / "deploy.json").read_text())
    (row,) = payload["rows"]
    assert row["flops"] == pytest.approx(payload["dense"]["resnet20"]["flops"] / 2, rel=0.03)
    assert row["test_acc_refit"] > row["test_acc_bn_only"]  # the re-fit recovers what BatchNorm alone cannot
    assert [(x["engine"], x["batch"]) for x in row["latency"]] == [
        ("eager", 1), ("eager", 16), ("onnxruntime", 1), ("onnxruntime", 16)]
    assert row["limit_flops"] == pytest.approx(row["flops"], rel=0.15)
    assert (out / "speedups_resnet20_x2.png").is_file() and "fraction" in (out / "deploy.md").read_text()
    again = _run("--quick", "--out", str(out), "--remeasure-latency")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "test acc right after pruning" not in again.stdout  # the accuracy row came from the cache
    assert json.loads((out / "deploy.json").read_text())["rows"][0]["test_acc"] == row["test_acc"]


def test_bad_factors_are_refused(tmp_path):
    bad = _run("--quick", "--factors", "1", "--out", str(tmp_path))
    assert bad.returncode == 2 and "--factors must be > 1" in bad.stderr
