"""Prints the Markdown rows of the baseline table from the committed checkpoints' own metadata.

    python benchmarks/checkpoints/baseline_table.py
"""

from __future__ import annotations

from pathlib import Path

from prunekit import read_metadata


def rows(folder: Path) -> list[str]:
    out = []
    for path in sorted(folder.glob("*-fmnist.safetensors")):
        meta = read_metadata(path)
        m, metrics = meta["model"], meta["metrics"]
        width = f" (width {m['width']:g})" if m["width"] != 1 else ""
        out.append(f"| `{path.name}` | {m['name']}{width} | {metrics['params']:,} | {metrics['flops'] / 1e6:.1f} | "
                   f"{meta['epoch']} | {metrics['val_acc']:.2%} | {metrics['test_acc']:.2%} |")
    return out


if __name__ == "__main__":
    print("\n".join(rows(Path(__file__).parent)))
