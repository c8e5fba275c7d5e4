"""benchmarks/structured.py: the --quick run writes every output with every field, re-running resumes from the
per-row cache, and misuse (missing checkpoints, unknown criteria) fails with a clear message."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
    proc = _run("--quick", "--no-progress", "--extra-seeds", "1", "--out", str(out))
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
    assert "## Several seeds" in text and "| resnet20 | x2 | 1 | " in text  # each tool's best criterion, 2 seeds


@pytest.mark.slow
def test_extra_seeds_repeat_each_tools_best_criterion_on_validation(quick_out, bench):
    rows = json.loads((quick_out / "structured.json").read_text())["rows"]
    for tool in bench.TOOLS:
        first = [r for r in rows if r["tool"] == tool and r["seed"] == 0]
        again = [r for r in rows if r["tool"] == tool and r["seed"] == 1]
        assert [r["method"] for r in again] == [max(first, key=lambda r: r["val_acc"])["method"]]
        assert again[0]["history"] != next(r for r in first if r["method"] == again[0]["method"])["history"]


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
    proc = _run("--quick", "--no-progress", "--no-coverage", "--extra-seeds", "1", "--out", str(quick_out))
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
    (["--extra-seeds", "0"], "--extra-seeds must be distinct seeds > 0"),
    (["--extra-seeds", "1", "--factors", "4", "--seed-factors", "8"], "--seed-factors [8.0] must be among"),
])
def test_misuse_is_rejected(tmp_path, args, message):
    proc = _run(*args, "--checkpoint-dir", str(tmp_path), "--out", str(tmp_path / "out"), timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr


@pytest.mark.slow
def test_remeasure_latency_rebuilds_every_cached_row_and_keeps_its_accuracy(quick_out):
    before = json.loads((quick_out / "structured.json").read_text())["rows"]
    proc = _run("--quick", "--no-progress", "--no-coverage", "--extra-seeds", "1", "--remeasure-latency", "--out",
                str(quick_out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    after = json.loads((quick_out / "structured.json").read_text())["rows"]
    assert len(after) == len(before) and all(r["latency_remeasured"] for r in after)
    for a, b in zip(after, before):
        assert (a["params"], a["flops"], a["test_acc"]) == (b["params"], b["flops"], b["test_acc"])
        assert a["speedup_per_flops_reduction"] == pytest.approx(a["latency_speedup"] / a["flops_reduction"])


def _row(tool, method, seed, val, test, model="resnet20", factor=8.0):
    return {"model": model, "tool": tool, "method": method, "factor": factor, "seed": seed, "val_acc": val,
            "test_acc": test}


def test_best_criterion_is_chosen_on_seed_0_validation_never_test(bench):
    rows = [_row("prunekit", "l1", 0, 0.90, 0.80), _row("prunekit", "bn", 0, 0.85, 0.95),
            _row("prunekit", "bn", 1, 0.99, 0.99), _row("torch-pruning", "l1", 0, 0.99, 0.99)]
    assert bench.best_criterion(rows, "resnet20", "prunekit", 8.0) == "l1"
    with pytest.raises(SystemExit, match="no prunekit row of vgg11"):
        bench.best_criterion(rows, "vgg11", "prunekit", 8.0)


def test_seeds_table_reports_mean_spread_and_the_goal(bench):
    rows = [_row("prunekit", "l1", s, 0.9, acc) for s, acc in enumerate((0.900, 0.910, 0.920))]
    rows += [_row("torch-pruning", "bn", s, 0.9, acc) for s, acc in enumerate((0.890, 0.900, 0.910))]
    rows += [_row("torch-pruning", "l1", 0, 0.8, 0.5)]  # one seed: not a deciding row
    table = bench.seeds_table({2: rows}).splitlines()
    assert table[2] == ("| resnet20 | x8 | 2 | l1 | 91.00 ± 1.00 (n=3) | bn | 90.00 ± 1.00 (n=3) | +1.00 | met |")
    assert len(table) == 3
    assert "| -0.50 | missed |" in bench.seeds_table({1: [{**r, "test_acc": r["test_acc"] - 0.015 * (
        r["tool"] == "prunekit")} for r in rows]})


def test_torch_pruning_recipe_reaches_a_parameter_target(bench):
    import common
    import prunekit
    from prunekit.data import DataConfig
    from prunekit.training import TrainConfig

    data = prunekit.load_dataset(DataConfig(name="digits", limit=256))
    torch.manual_seed(0)
    net = prunekit.create_model(prunekit.ModelConfig(name="resnet20", num_classes=10, in_channels=1, input_size=8,
                                                     width=0.25))
    s = common.Settings(finetune=TrainConfig(epochs=0, lr=0.01), data=DataConfig(name="digits"),
                        checkpoint_sha256="", tp_iterative_steps=100)
    dense_params = prunekit.count_params(net)
    pruned, info = bench.prune_torch_pruning(net, data, "l1", [2.0], s, progress=False, kind="params")[2.0]
    assert info["target_reached"] and info["tp_params_reduction"] >= 2.0
    assert 1.9 < dense_params / prunekit.count_params(pruned) < 2.6
    with pytest.raises(ValueError, match="kind must be one of"):
        bench.prune_torch_pruning(net, data, "l1", [2.0], s, progress=False, kind="latency")
