"""Reports: a before/after table printed to the terminal, and ``report.md`` + ``report.json`` on disk."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from prunekit.persistence.checkpoint import atomic_write

# (key in a ModelSummary dict, column title, formatter)
COLUMNS: list[tuple[str, str, Any]] = [
    ("params", "params", lambda v: f"{v:,}"),
    ("flops", "MFLOPs", lambda v: f"{v / 1e6:.2f}"),
    ("storage_bits", "storage KiB", lambda v: f"{v / 8 / 1024:.1f}"),
    ("latency_ms_b1", "latency b1 ms", lambda v: f"{v:.3f}"),
    ("latency_ms_b64", "latency b64 ms", lambda v: f"{v:.2f}"),
    ("test_acc_before_finetune", "test acc right after pruning", lambda v: f"{v:.4f}"),
    ("val_acc", "val acc", lambda v: f"{v:.4f}"),
    ("test_acc", "test acc", lambda v: f"{v:.4f}"),
]


def _cell(fmt, value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return fmt(value)


def summary_table(rows: dict[str, dict[str, Any]], markdown: bool = False) -> str:
    """Rows are named summaries (``{"dense": {...}, "pruned": {...}}``); a ratio row is added for two rows."""
    names = list(rows)
    header = ["model", *[title for _, title, _ in COLUMNS]]
    body = [[name, *[_cell(fmt, rows[name].get(key)) for key, _, fmt in COLUMNS]] for name in names]
    if len(names) == 2:
        a, b = rows[names[0]], rows[names[1]]
        ratio = ["ratio"]
        for key, _, _ in COLUMNS:
            va, vb = a.get(key), b.get(key)
            if key.endswith("acc"):
                ratio.append(f"{(vb - va) * 100:+.2f} pt" if va is not None and vb is not None else "-")
            else:
                finite = all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in (va, vb))
                ratio.append(f"{va / vb:.2f}x" if finite else "-")
        body.append(ratio)
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def fmt_row(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    sep = "-" * (sum(widths) + 2 * (len(widths) - 1))
    return "\n".join([fmt_row(header), sep, *map(fmt_row, body)])


def write_report(out_dir: str | Path, title: str, rows: dict[str, dict[str, Any]], *,
                 extra: dict[str, Any] | None = None, notes: list[str] | None = None,
                 images: list[str] | None = None) -> Path:
    """Write ``report.json`` (rows plus ``extra``) and ``report.md`` (table, notes, images) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {**rows, **(extra or {})}
    atomic_write(out / "report.json", lambda tmp: Path(tmp).write_text(json.dumps(payload, indent=2, default=str)))
    md = [f"# {title}", "", summary_table(rows, markdown=True), ""]
    md += [f"- {n}" for n in notes or []]
    md += [f"\n![{Path(i).stem}]({i})" for i in images or []]
    atomic_write(out / "report.md", lambda tmp: Path(tmp).write_text("\n".join(md) + "\n"))
    return out / "report.md"
