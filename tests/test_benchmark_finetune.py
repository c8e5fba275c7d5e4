"""benchmarks/finetune.py: --quick sweeps recipes on two pruned networks, chooses on validation, resumes; misuse
fails."""

from __future__ import annotations

import json

import pytest

from scripts import run_script


@pytest.mark.slow
def test_quick_run_chooses_the_best_mean_validation_recipe_and_resumes(tmp_path):
    out = tmp_path / "finetune"
    first = run_script("benchmarks/finetune.py", "--quick", "--out", str(out))
    assert first.returncode == 0, first.stderr[-2000:]
    payload = json.loads((out / "finetune.json").read_text())
    assert set(payload["models"]) == {"resnet20", "lenet5"}
    recipes = {(r["lr"], r["warmup"]) for m in payload["models"].values() for r in m["rows"]}
    assert recipes == {(0.01, 0.0), (0.01, 0.15), (0.02, 0.0), (0.02, 0.15)}

    def mean_val(key):
        return sum(r["val_acc"] for m in payload["models"].values() for r in m["rows"]
                   if (r["lr"], r["warmup"]) == key) / len(payload["models"])

    assert mean_val(tuple(payload["chosen"].values())) == max(mean_val(k) for k in recipes)
    md = (out / "finetune.md").read_text()
    assert "| mean val % | chosen |" in md and md.count("| yes |") == 1
    assert (out / "finetune.png").read_bytes()[:4] == b"\x89PNG"
    second = run_script("benchmarks/finetune.py", "--quick", "--out", str(out))
    assert second.returncode == 0 and "warm-up 0: val acc" not in second.stdout  # every row from the cache


@pytest.mark.parametrize("argv", [["--lrs", "0"], ["--warmups", "1"], ["--epochs", "0"]])
def test_misuse_is_a_clear_error(tmp_path, argv):
    proc = run_script("benchmarks/finetune.py", "--out", str(tmp_path), *argv)
    assert proc.returncode == 2 and "--lrs must be > 0, --warmups in [0, 1) and --epochs >= 1" in proc.stderr
