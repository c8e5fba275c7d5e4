"""``prunekit inspect``: a per-layer table of shapes, parameters, FLOPs and weight sparsity."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import torch
from torch import nn

from prunekit.measurement.metrics import count_flops, count_params, flops_by_module


def parse_input_spec(spec: str) -> tuple[int, int, int]:
    """``"3x32x32"`` -> (3, 32, 32); the image must be square."""
    try:
        c, h, w = (int(v) for v in spec.lower().split("x"))
    except ValueError:
        raise ValueError(f"input must look like CxHxW, e.g. 3x32x32; got {spec!r}") from None
    if min(c, h, w) < 1 or h != w:
        raise ValueError(f"input must be positive and square (CxHxH), got {spec!r}")
    return c, h, w


def layer_rows(model: nn.Module, input_shape: tuple[int, int, int]) -> list[dict]:
    """One row per module that owns parameters directly: name, type, weight shape, params, FLOPs, weight sparsity."""
    flops = flops_by_module(model, (1, *input_shape))
    rows = []
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if not own:
            continue
        weight = getattr(module, "weight", None)
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else tuple(own[0].shape)
        numel = sum(p.numel() for p in own)
        counted = weight if isinstance(weight, torch.Tensor) else own[0]  # sparsity of the weight itself
        sparsity = float((counted == 0).sum()) / max(counted.numel(), 1)
        rows.append({"name": name or "(root)", "type": type(module).__name__, "shape": shape, "params": numel,
                     "flops": flops.get(name, 0), "sparsity": sparsity})
    return rows


def format_table(rows: list[dict], total_params: int, total_flops: int) -> str:
    header = f"{'layer':<28} {'type':<18} {'weight shape':<20} {'params':>10} {'MFLOPs':>9} {'sparsity':>8}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['name'][:28]:<28} {r['type'][:18]:<18} {str(r['shape'])[:20]:<20} {r['params']:>10,} "
                     f"{r['flops'] / 1e6:>9.3f} {r['sparsity']:>8.1%}")
    lines.append("-" * len(header))
    lines.append(f"{'total':<68} {total_params:>10,} {total_flops / 1e6:>9.3f}")
    return "\n".join(lines)


def inspect_table(target: str, input_spec: str = "3x32x32", num_classes: int = 10, width: float = 1.0,
                  trusted_factories: Collection[str] = ()) -> str:
    """The table for a checkpoint path (its own input size) or a zoo model name (``input_spec``);
    ``trusted_factories`` are the user factories a checkpoint may import."""
    if target.endswith(".safetensors") or Path(target).is_file():
        from prunekit.persistence.architecture import input_shape_of, load_compressed

        model, meta = load_compressed(target, trusted_factories)
        cfg = meta["model"]
        shape = input_shape_of(cfg)
        what = f"{cfg['name']} (width {cfg['width']})" if "name" in cfg else cfg["factory"]
        if meta.get("architecture_changes"):
            what += f", {len(meta['architecture_changes'])} architecture change(s)"
        title = f"{target}: {what} on {shape[0]}x{shape[1]}x{shape[2]}"
        metrics = meta.get("metrics", {})
        if metrics.get("test_acc") is not None:
            title += f", test acc {metrics['test_acc']:.4f}"
    else:
        from prunekit.models import create_model

        shape = parse_input_spec(input_spec)
        model = create_model(target, num_classes=num_classes, in_channels=shape[0], input_size=shape[1],
                             width=width)
        title = f"{target} (width {width}) on {input_spec}"
    rows = layer_rows(model, shape)
    return title + "\n" + format_table(rows, count_params(model), count_flops(model, (1, *shape)))
