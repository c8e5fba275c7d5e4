"""benchmarks/eigendamage.py: --quick writes its table, JSON and plot; a re-run resumes from the row cache; misuse
fails with a clear message."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from scripts import run_script

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str):
    return run_script("benchmarks/eigendamage.py", *args)


@pytest.mark.slow
def test_quick_run_writes_outputs_and_resumes(tmp_path):
    out = tmp_path / "quick"
    first = _run("--quick", "--no-progress", "--out", str(out))
    assert first.returncode == 0, first.stderr[-2000:]
    payload = json.loads((out / "eigendamage.json").read_text())
    assert {(r["method"], r["schedule"], r["target"]) for r in payload["rows"]} == {
        (m, "one-shot", k) for m in ("eigendamage", "kron-obs") for k in ("flops", "params")}
    for r in payload["rows"]:  # every row at equal FLOPs and at equal parameters
        reduction = r["flops_reduction"] if r["target"] == "flops" else r["params_reduction"]
        assert reduction == pytest.approx(4.0, rel=0.025)
        assert r["statistics_per_epoch"] > 0 and 0 <= r["test_acc"] <= 1
    ed = {r["target"]: r for r in payload["rows"] if r["method"] == "eigendamage"}
    assert ed["flops"]["params_reduction"] > 4  # bottlenecks remove parameters faster than FLOPs
    assert ed["params"]["flops_reduction"] < 4  # so at equal parameters they keep more FLOPs
    text = (out / "eigendamage.md").read_text()
    assert "| eigendamage | one-shot | flops x4 |" in text and "| eigendamage | one-shot | params x4 |" in text
    assert "x4 params: test acc % (FLOPs red.)" in text  # the summary reports FLOPs at equal parameters
    assert (out / "eigendamage_accuracy_vs_flops.png").read_bytes()[:4] == b"\x89PNG"
    second = _run("--quick", "--no-progress", "--out", str(out))
    assert second.returncode == 0
    assert "one-shot flops x4: FLOPs" not in second.stdout  # every row came from the cache
    assert json.loads((out / "eigendamage.json").read_text())["rows"] == payload["rows"]
    partial = _run("--quick", "--no-progress", "--cached-only", "--methods", "eigendamage", "c-obd", "--out", str(out))
    assert partial.returncode == 0, partial.stderr[-2000:]
    assert "2 row(s) not run yet, left out (--cached-only)" in partial.stdout  # c-obd: never run, not run now
    assert [r["method"] for r in json.loads((out / "eigendamage.json").read_text())["rows"]] == ["eigendamage"] * 2
    third = _run("--quick", "--no-progress", "--remeasure-latency", "--out", str(out))
    assert third.returncode == 0, third.stderr[-2000:]
    again = json.loads((out / "eigendamage.json").read_text())["rows"]
    assert all(r["latency_remeasured"] for r in again)
    assert [(r["params"], r["flops"], r["test_acc"]) for r in again] == \
        [(r["params"], r["flops"], r["test_acc"]) for r in payload["rows"]]


@pytest.mark.parametrize("argv, message", [
    (["--methods", "magic"], "unknown methods ['magic']"),
    (["--factors", "1"], "--factors must be > 1"),
    (["--rounds", "3", "--finetune-epochs", "2"], "--finetune-epochs >= --rounds"),
])
def test_misuse_is_a_clear_error(argv, message, tmp_path):
    proc = _run("--out", str(tmp_path), *argv)
    assert proc.returncode == 2 and message in proc.stderr


@pytest.mark.slow
def test_damping_scan_quick_picks_a_value_on_validation(tmp_path):
    out = tmp_path / "damping"
    script = ROOT / "benchmarks" / "damping.py"
    proc = subprocess.run([sys.executable, str(script), "--quick", "--methods", "kron-obs", "--dampings", "0.001",
                           "0.1", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    payload = json.loads((out / "damping.json").read_text())
    assert [r["damping"] for r in payload["rows"]] == [0.001, 0.1]
    best = max(payload["rows"], key=lambda r: r["val_acc"])["damping"]
    assert payload["best_on_validation"] == {"kron-obs": best}
    assert "| kron-obs | 0.1 |" in (out / "damping.md").read_text()


def test_torch_pruning_best_criterion_is_chosen_on_validation_per_model(tmp_path):
    import importlib.util

    script = ROOT / "benchmarks" / "eigendamage.py"
    sys.path.insert(0, str(script.parent))
    spec = importlib.util.spec_from_file_location("eigendamage_benchmark", script)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    row = lambda model, method, val, test, seed=0, tool="torch-pruning", factor=8.0: {  # noqa: E731
        "model": model, "tool": tool, "method": method, "val_acc": val, "test_acc": test, "seed": seed,
        "factor": factor}
    rows = [row("resnet20", "l1", 0.80, 0.99), row("resnet20", "taylor", 0.85, 0.10),
            row("resnet20", "l1", 0.99, 0.99, seed=1), row("resnet20", "bn", 0.99, 0.99, factor=4.0),
            row("resnet20", "bn", 0.99, 0.99, tool="prunekit"), row("vgg11", "random", 0.9, 0.9)]
    path = tmp_path / "structured.json"
    path.write_text(json.dumps({"rows": rows}))
    assert bench.best_tp_criterion(path, "resnet20", 8.0) == "taylor"
    assert bench.best_tp_criterion(path, "vgg11", 8.0) == "random"
    with pytest.raises(SystemExit, match="no Torch-Pruning row of resnet20 at x2"):
        bench.best_tp_criterion(path, "resnet20", 2.0)
