"""prunekit compare: a dense model, an ADMM-pruned (quantized) variant and a channel-pruned variant, measured."""

from __future__ import annotations

import json

import pytest

from prunekit.cli import main


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    assert main(["train", "--model", "lenet5", "--data", "synthetic", "--epochs", "2", "--out", str(root / "dense"),
                 "--no-progress", "--device", "cpu"]) == 0
    dense = root / "dense" / "model.safetensors"
    assert main(["prune", "admm", "--checkpoint", str(dense), "--target", "params=x10", "--quant", "bits=4",
                 "--admm-epochs", "1", "--retrain-epochs", "1", "--out", str(root / "admm"), "--no-progress",
                 "--no-latency"]) == 0
    assert main(["prune", "l1", "--checkpoint", str(dense), "--target", "params=0.3", "--finetune-epochs", "1",
                 "--out", str(root / "l1"), "--no-progress", "--no-latency"]) == 0
    l1 = root / "l1" / "params-0.3" / "round_1" / "pruned.safetensors"
    return root, dense, root / "admm" / "params-0.1" / "model.safetensors", l1


def test_compare_measures_storage_and_both_kernels_and_gives_a_verdict(variants, capsys):
    root, dense, admm, l1 = variants
    code = main(["compare", str(dense), "--variant", f"admm={admm}", "--variant", f"channels={l1}", "--batch", "8",
                 "--min-run-time", "0.02", "--out", str(root / "cmp")])
    assert code == 0, capsys.readouterr().err
    result = json.loads((root / "cmp" / "compare.json").read_text())
    rows = result["rows"]
    assert set(rows) == {"dense", "admm", "channels"}
    assert rows["admm"]["weight_sparsity"] > 0.8 and rows["admm"]["latency_sparse_kernel_ms"] is not None
    assert rows["channels"]["latency_sparse_kernel_ms"] is None  # shrunk: no zeros to skip
    assert rows["admm"]["storage_bits"] < rows["dense"]["storage_bits"] / 5  # 4-bit codes, 10x fewer weights
    assert rows["channels"]["params"] < rows["dense"]["params"]
    assert result["verdict"]["storage"] in ("admm", "channels") and result["verdict"]["speed"] in ("admm", "channels")
    be = result["break_even"]
    assert len(be["sparse_ms"]) == len(be["sparsities"])
    text = (root / "cmp" / "compare.md").read_text()
    assert "Verdict: smallest storage" in text and "sparse kernel starts to win" in text
    assert "![comparison](compare.png)" in text
    assert (root / "cmp" / "compare.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("argv, message", [
    (["--variant", "broken"], "NAME=PATH"),
    ([], "at least one --variant"),
])
def test_compare_misuse_is_one_line(variants, capsys, argv, message):
    _, dense, _, _ = variants
    assert main(["compare", str(dense), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
