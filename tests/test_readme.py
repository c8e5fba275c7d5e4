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


@pytest.mark.parametrize("name", ["structured", "structured-seeds", "eigendamage", "eigendamage-long", "deploy",
                                  "dpp", "dpp-filter", "admm", "finetune", "minilm", "related", "latency"])
def test_readme_benchmark_tables_are_the_committed_results(name):
    """The README's generated tables are exactly what the benchmark scripts make from their committed JSON
    (refresh them with ``python benchmarks/readme_tables.py``)."""
    import sys

    sys.path.insert(0, str(README.parent / "benchmarks"))
    import readme_tables

    text = README.read_text()
    start = text.index("\n", text.index(f"<!-- {name} table")) + 1
    end = text.index(f"<!-- end {name} table -->")
    assert text[start:end].strip() == readme_tables.tables()[name].strip()
