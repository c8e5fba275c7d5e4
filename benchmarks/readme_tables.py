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
import latency
import minilm
import related
import structured

ROOT = Path(__file__).resolve().parents[1]


def _result(folder: str, name: str) -> dict:
    return json.loads((ROOT / "benchmarks" / "results" / folder / f"{name}.json").read_text())


def _epochs(result: dict) -> int:
    """The fine-tuning epochs of a structured run (its settings are the same for every model)."""
    return next(iter(result["dense"].values()))["settings"]["finetune"]["epochs"]


def tables() -> dict[str, str]:
    structured_runs = [_result(folder, "structured") for folder in ("structured", "structured-2ep")]
    return {
        "structured": structured.comparison_table(structured_runs[0]["rows"]),
        "structured-seeds": structured.seeds_table({_epochs(r): r["rows"] for r in structured_runs}),
        "eigendamage": eigendamage.summary_table(_result("eigendamage", "eigendamage")["rows"]),
        "eigendamage-long": eigendamage.summary_table(_result("eigendamage-long", "eigendamage")["rows"]),
        "deploy": deploy.readme_table(_result("deploy", "deploy")["rows"]),
        "dpp": dpp.readme_table(_result("dpp", "dpp")),
        "dpp-filter": dpp.readme_filter_table(_result("dpp", "dpp")),
        "admm": admm.readme_table(_result("admm", "admm")),
        "finetune": finetune.table(_result("finetune", "finetune")),
        "minilm": (lambda r: minilm.table(r) + "\n\n" + minilm.goals(r))(_result("minilm", "minilm")),
        "related": _related(_result("related", "related")),
        "latency": (lambda r: latency.target_table(r["rows"], r["dense"]) + "\n\n" + latency.goals(r["rows"]) + "\n\n"
                    + latency.rounding_table(r["rounding"]))(_result("latency", "latency")),
    }


def _related(result: dict) -> str:
    """The channel table of the related methods and DJPQ's beside the ADMM and DPP joint rows."""
    out = related.channel_table(result["rows"], result["dense"])
    if result["djpq"]:
        out += "\n\n" + related.djpq_table(result["djpq"], result["djpq_dense"], "LeNet-5", related.joint_references())
    return out


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
