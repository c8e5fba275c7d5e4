"""The README's command-line examples run as written (its Python example runs as a doctest)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from prunekit.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_cli_lines() -> list[str]:
    """`prunekit ...` lines of the README's bash blocks, except the `make` commands."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    return [line.split("#")[0].strip() for block in blocks for line in block.splitlines()
            if line.startswith("prunekit ")]


def test_readme_has_cli_examples():
    assert len(readme_cli_lines()) >= 3


def test_readme_cli_examples_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for line in readme_cli_lines():
        argv = shlex.split(line)[1:]
        code = main([*argv, "--no-progress"] if argv[0] == "train" else argv)
        out = capsys.readouterr()
        assert code == 0, f"`{line}` failed: {out.err}"
        if argv[0] == "eval":
            assert re.search(r"test accuracy 0\.\d{4}", out.out)
        if argv[0] == "inspect":
            assert "total" in out.out


@pytest.mark.parametrize("target", ["make demo", "make test"])
def test_readme_names_the_two_commands(target):
    assert target in README.read_text()


def test_readme_structured_table_is_the_committed_benchmark_result():
    """The README's table is exactly what benchmarks/structured.py made from its committed results."""
    import importlib.util
    import json
    import sys

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("structured_benchmark", root / "benchmarks" / "structured.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    rows = json.loads((root / "benchmarks" / "results" / "structured" / "structured.json").read_text())["rows"]
    text = README.read_text()
    start = text.index("<!-- structured table")
    start = text.index("\n", start) + 1
    end = text.index("<!-- end structured table -->")
    assert text[start:end].strip() == module.comparison_table(rows).strip()


def test_readme_eigendamage_table_is_the_committed_benchmark_result():
    import json
    import sys

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "benchmarks"))
    import eigendamage

    rows = json.loads((root / "benchmarks" / "results" / "eigendamage" / "eigendamage.json").read_text())["rows"]
    text = README.read_text()
    start = text.index("\n", text.index("<!-- eigendamage table")) + 1
    end = text.index("<!-- end eigendamage table -->")
    assert text[start:end].strip() == eigendamage.summary_table(rows).strip()
