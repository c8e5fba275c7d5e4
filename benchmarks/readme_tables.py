"""Rewrites the generated tables of the README from the committed benchmark results.

    python benchmarks/readme_tables.py

Each table sits between ``<!-- NAME table ... -->`` and ``<!-- end NAME table -->``; ``tests/test_readme.py``
checks that they equal what the benchmark scripts make from their JSON, so run this after re-running a benchmark.
"""

from __future__ import annotations

import json
from pathlib import Path

import admm
import deploy
import dpp
import eigendamage
import finetune
import structured

ROOT = Path(__file__).resolve().parents[1]


def tables() -> dict[str, str]:
    results = ROOT / "benchmarks" / "results"
    return {
        "structured": structured.comparison_table(json.loads((results / "structured" / "structured.json").read_text())
                                                  ["rows"]),
        "eigendamage": eigendamage.summary_table(json.loads((results / "eigendamage" / "eigendamage.json")
                                                            .read_text())["rows"]),
        "deploy": deploy.readme_table(json.loads((results / "deploy" / "deploy.json").read_text())["rows"]),
        "dpp": dpp.readme_table(json.loads((results / "dpp" / "dpp.json").read_text())),
        "dpp-filter": dpp.readme_filter_table(json.loads((results / "dpp" / "dpp.json").read_text())),
        "admm": admm.readme_table(json.loads((results / "admm" / "admm.json").read_text())),
        "finetune": finetune.table(json.loads((results / "finetune" / "finetune.json").read_text())),
    }


def replace_table(text: str, name: str, table: str) -> str:
    start = text.index("\n", text.index(f"<!-- {name} table")) + 1
    end = text.index(f"<!-- end {name} table -->")
    return text[:start] + "\n" + table + "\n\n" + text[end:]


def main() -> int:
    readme = ROOT / "README.md"
    text = readme.read_text()
    for name, table in tables().items():
        text = replace_table(text, name, table)
    readme.write_text(text)
    print(f"updated {readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
