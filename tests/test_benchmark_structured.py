"""benchmarks/structured.py: the --quick run writes every output with every field, re-running resumes from the
per-row cache, and misuse (missing checkpoints, unknown criteria) fails with a clear message."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from prunekit.models import list_models

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "structured.py"


def _load_script():
    if str(SCRIPT.parent) not in sys.path:  # the benchmarks import their shared helpers (benchmarks/common.py)
        sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("structured_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def _run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def bench():
    return _load_script()


@pytest.fixture(scope="module")
def quick_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("structured") / "quick"
    proc = _run("--quick", "--no-progress", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


@pytest.mark.slow
def test_quick_writes_every_output(quick_out):
    for name in ("structured.json", "structured.md", "structured_accuracy_vs_flops.png", "coverage.json"):
        assert (quick_out / name).is_file(), name
    assert (quick_out / "structured_accuracy_vs_flops.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_quick_rows_have_every_field(quick_out, bench):
    result = json.loads((quick_out / "structured.json").read_text())
    assert result["quick"] is True
    assert result["command"].startswith("python benchmarks/structured.py") and "--quick" in result["command"]
    assert set(result["dense"]) == {"resnet20"}
    dense = result["dense"]["resnet20"]
    for key in ("params", "flops", "val_acc", "test_acc", "latency_ms", "settings"):
        assert key in dense
    rows = result["rows"]
    assert {(r["tool"], r["method"]) for r in rows} == {("prunekit", m) for m in bench.QUICK["methods"]} | {
        ("torch-pruning", m) for m in bench.QUICK["tp_methods"]}
    for row in rows:
        missing = set(bench.ROW_FIELDS) - set(row)
        assert not missing, f"{row['tool']} {row['method']} lacks {sorted(missing)}"
        assert row["factor"] == 2.0
        assert row["flops"] < row["dense_flops"] and row["params"] < row["dense_params"]
        assert row["flops_reduction"] == pytest.approx(row["dense_flops"] / row["flops"])
        assert 1.8 < row["flops_reduction"] < 2.3  # the target is x2; Torch-Pruning stops at the first step past it
        assert row["latency_dense_ms"] > 0 and row["latency_pruned_ms"] > 0
        assert row["latency_speedup"] == pytest.approx(row["latency_dense_ms"] / row["latency_pruned_ms"])
        assert row["speedup_per_flops_reduction"] == pytest.approx(row["latency_speedup"] / row["flops_reduction"])
        for key in ("val_acc_pruned", "test_acc_pruned", "val_acc", "test_acc", "dense_test_acc"):
            assert 0.0 <= row[key] <= 1.0, key
        assert row["best_epoch"] == 1 and len(row["history"]) == 1
        assert row["latency_batch"] == 64


@pytest.mark.slow
def test_quick_markdown_has_command_and_both_tables(quick_out):
    text = (quick_out / "structured.md").read_text()
    command = json.loads((quick_out / "structured.json").read_text())["command"]
    assert command in text.splitlines()[4]
    assert "| resnet20 | prunekit | l1 | x2 |" in text
    assert "| resnet20 | torch-pruning | l1 | x2 |" in text
    assert "## Coverage" in text and "| residual_add | tests |" in text


@pytest.mark.slow
def test_quick_coverage_has_every_cell(quick_out, bench):
    coverage = json.loads((quick_out / "coverage.json").read_text())
    archs = coverage["architectures"]
    assert set(list_models()) <= set(archs)
    assert any(a["source"] == "tests" for a in archs.values())
    for name, cell in archs.items():
        for tool in bench.TOOLS:
            assert set(bench.COVERAGE_FIELDS) <= set(cell[tool]), (name, tool)
            assert cell[tool]["status"] in bench.COVERAGE_STATUSES, (name, tool, cell[tool])
    # the plain residual network is pruned exactly by both tools
    for tool in bench.TOOLS:
        assert archs["resnet20"][tool]["status"] == "ok"
        assert archs["resnet20"][tool]["max_abs_diff"] < 1e-4


@pytest.mark.slow
def test_rerun_resumes_from_the_cache(quick_out):
    cache = quick_out / "cache"
    before = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.json")}
    rows_before = json.loads((quick_out / "structured.json").read_text())["rows"]
    proc = _run("--quick", "--no-progress", "--no-coverage", "--out", str(quick_out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {p.name: p.stat().st_mtime_ns for p in cache.glob("*.json")} == before
    assert json.loads((quick_out / "structured.json").read_text())["rows"] == rows_before


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    proc = _run("--models", "resnet20", "--checkpoint-dir", str(tmp_path), "--out", str(tmp_path / "out"),
                timeout=120)
    assert proc.returncode != 0
    assert "resnet20-fmnist.safetensors" in proc.stderr and "train_baselines.sh resnet20" in proc.stderr
    assert not (tmp_path / "out" / "structured.json").exists()


@pytest.mark.parametrize("args, message", [
    (["--methods", "l3"], "unknown criteria"),
    (["--tp-methods", "hessian"], "unknown criteria"),
    (["--factors", "0.5"], "--factors must be > 1"),
    (["--models", "lenet5"], "unknown --models"),
])
def test_misuse_is_rejected(tmp_path, args, message):
    proc = _run(*args, "--checkpoint-dir", str(tmp_path), "--out", str(tmp_path / "out"), timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr


@pytest.mark.slow
def test_remeasure_latency_rebuilds_every_cached_row_and_keeps_its_accuracy(quick_out):
    before = json.loads((quick_out / "structured.json").read_text())["rows"]
    proc = _run("--quick", "--no-progress", "--no-coverage", "--remeasure-latency", "--out", str(quick_out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    after = json.loads((quick_out / "structured.json").read_text())["rows"]
    assert len(after) == len(before) and all(r["latency_remeasured"] for r in after)
    for a, b in zip(after, before):
        assert (a["params"], a["flops"], a["test_acc"]) == (b["params"], b["flops"], b["test_acc"])
        assert a["speedup_per_flops_reduction"] == pytest.approx(a["latency_speedup"] / a["flops_reduction"])
