"""``prunekit compare``: non-structured vs structured pruning on this machine, storage and speed measured.

The fair comparison of ADMM-NN-S (Ma et al. 2019, arXiv 1907.02124): for a dense model and pruned variants (at
matched accuracy and the same quantization, which the user arranges), report test accuracy, exact storage
(weights + indices + scales, the smallest format of :mod:`prunekit.measurement.formats`), and measured CPU
latency of real kernels: the dense kernel on the (masked or shrunk) weights, and, for variants with zeros, CSR
sparse kernels (:mod:`prunekit.measurement.sparse_kernels`). The break-even sparsity of the dense model's largest
layer tells from which sparsity the sparse kernel starts to pay on this machine. The verdict names the smallest and
the fastest variant.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.data import DataConfig, load_dataset
from prunekit.measurement.formats import encoding_storage
from prunekit.measurement.metrics import check_latency_settings, count_flops, count_params, measure_latency
from prunekit.measurement.sparse_kernels import break_even_sparsity, to_sparse_kernels
from prunekit.persistence.architecture import check_pruned_from, input_shape_of, load_compressed
from prunekit.persistence.checkpoint import CheckpointError, atomic_write
from prunekit.training import evaluate


def _weight_layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def _sparsity(model: nn.Module) -> float:
    ws = [m.weight for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    total = sum(w.numel() for w in ws)
    return float(sum(int((w == 0).sum()) for w in ws)) / max(total, 1)


def _largest_gemm(model: nn.Module) -> tuple[int, int]:
    shapes = [(m.weight.shape[0], m.weight[0].numel()) for m in model.modules()
              if isinstance(m, (nn.Linear, nn.Conv2d))]
    return max(shapes, key=lambda s: s[0] * s[1])


def compare_models(dense_path: str | Path, variants: dict[str, str | Path], *, batch: int = 64,
                   min_run_time: float = 0.3, break_even: bool = True, log=print,
                   trusted_factories: Collection[str] = ()) -> dict[str, Any]:
    """Measure the dense checkpoint and each variant (prunekit checkpoints: dense, pruned or ADMM).

    Every variant must be pruned from the dense network (same base, the dense network's architecture changes
    first); ``trusted_factories`` are the user factories the checkpoints may import.

    Raises:
        ValueError: a bad latency setting, a variant named ``dense`` or a variant of another network.
    """
    check_latency_settings(min_run_time, batches=(batch,))
    if "dense" in variants:
        raise ValueError("variant name 'dense' is taken by the dense model; name the variant otherwise")
    dense, meta = load_compressed(dense_path, trusted_factories)
    if "data" not in meta:
        raise ValueError(f"{dense_path} does not record its dataset; compare needs a prunekit checkpoint")
    data = load_dataset(DataConfig.from_dict(meta["data"]))
    shape = input_shape_of(meta["model"])
    models: dict[str, tuple[nn.Module, dict[str, Any]]] = {"dense": (dense, meta)}
    for name, path in variants.items():
        model, vmeta = load_compressed(path, trusted_factories)
        check_pruned_from(meta, vmeta, str(dense_path), f"variant {name} ({path})", dense)
        models[name] = (model, vmeta)
    rows: dict[str, dict[str, Any]] = {}
    for name, (model, vmeta) in models.items():
        model.eval()
        encoding = vmeta.get("encoding", {})
        unknown = sorted(set(encoding.get("masked_layers") or []) | set(encoding.get("scales") or {}))
        unknown = [n for n in unknown if n not in _weight_layers(model)]
        if unknown:
            raise CheckpointError(f"{variants.get(name, dense_path)}: metadata field 'scales' names {unknown[:3]}, "
                                  "which are not Conv2d/Linear layers of the network")
        storage = encoding_storage(model, encoding)
        sparsity = _sparsity(model)
        row = {"test_acc": evaluate(model, data.test)["acc"], "params": count_params(model),
               "nonzero_params": int(sum(int((p != 0).sum()) for p in model.parameters())),
               "flops": count_flops(model, (1, *shape)), "weight_sparsity": sparsity,
               "storage_bits": storage["bits"][storage["best"]], "storage_format": storage["best"],
               "latency_dense_kernel_ms": measure_latency(model, shape, batch, min_run_time=min_run_time).median_ms,
               "latency_sparse_kernel_ms": None}
        if sparsity > 0:
            row["latency_sparse_kernel_ms"] = measure_latency(to_sparse_kernels(model), shape, batch,
                                                              min_run_time=min_run_time).median_ms
        row["latency_best_ms"] = min(v for v in (row["latency_dense_kernel_ms"], row["latency_sparse_kernel_ms"])
                                     if v is not None)
        rows[name] = row
        log(f"{name}: test acc {row['test_acc']:.4f}, storage {row['storage_bits'] / 8 / 1024:.1f} KiB "
            f"({row['storage_format']}), latency {row['latency_best_ms']:.2f} ms")
    result: dict[str, Any] = {"rows": rows, "batch": batch, "threads": torch.get_num_threads()}
    if break_even:
        out_f, in_f = _largest_gemm(dense)
        be = break_even_sparsity(out_f, in_f, batch=batch, min_run_time=min_run_time / 2)
        result["break_even"] = {"layer_shape": [out_f, in_f], "batch": batch, "sparsities": be.sparsities,
                                "dense_ms": be.dense_ms, "sparse_ms": be.sparse_ms, "break_even": be.break_even}
    pruned = {k: v for k, v in rows.items() if k != "dense"}
    if pruned:
        smallest = min(pruned, key=lambda k: pruned[k]["storage_bits"])
        fastest = min(pruned, key=lambda k: pruned[k]["latency_best_ms"])
        others_s = [v["storage_bits"] for k, v in pruned.items() if k != smallest]
        others_f = [v["latency_best_ms"] for k, v in pruned.items() if k != fastest]
        storage_margin = min(others_s) / pruned[smallest]["storage_bits"] if others_s else None
        speed_margin = min(others_f) / pruned[fastest]["latency_best_ms"] if others_f else None
        result["verdict"] = {"storage": smallest, "storage_margin": storage_margin,
                             "speed": fastest, "speed_margin": speed_margin}
    return result


def comparison_markdown(result: dict[str, Any]) -> str:
    lines = ["| model | test acc % | params (nonzero) | MFLOPs | weight sparsity | storage KiB (format) | "
             f"latency b{result['batch']} ms dense kernel | sparse kernel |", "|---|---|---|---|---|---|---|---|"]
    for name, r in result["rows"].items():
        sparse = "-" if r["latency_sparse_kernel_ms"] is None else f"{r['latency_sparse_kernel_ms']:.2f}"
        lines.append(f"| {name} | {100 * r['test_acc']:.2f} | {r['params']:,} ({r['nonzero_params']:,}) | "
                     f"{r['flops'] / 1e6:.2f} | {r['weight_sparsity']:.3f} | "
                     f"{r['storage_bits'] / 8 / 1024:.1f} ({r['storage_format']}) | "
                     f"{r['latency_dense_kernel_ms']:.2f} | {sparse} |")
    if "break_even" in result:
        be = result["break_even"]
        found = "never in the range measured" if be["break_even"] is None else f"at {be['break_even']:.3g} sparsity"
        lines += ["", f"CSR kernel vs dense on the largest layer ({be['layer_shape'][0]} x {be['layer_shape'][1]}, "
                      f"batch {be['batch']}): the sparse kernel starts to win {found}."]
    v = result.get("verdict")
    if v:
        def margin(x):
            return f" by {x:.2f}x over the next" if x else ""
        lines += ["", f"Verdict: smallest storage: {v['storage']}{margin(v['storage_margin'])}; fastest: "
                      f"{v['speed']}{margin(v['speed_margin'])}."]
    return "\n".join(lines)


def write_comparison(result: dict[str, Any], out: str | Path, overwrite: bool = False) -> Path:
    import json

    from prunekit.measurement.plots import plot_comparison
    from prunekit.persistence.outputs import output_lock

    with output_lock(out) as outdir:
        from prunekit.persistence.outputs import check_output_files

        check_output_files({f"--out ({name})": outdir / name for name in ("compare.md", "compare.json", "compare.png")},
                           overwrite=overwrite)
        atomic_write(outdir / "compare.json", lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1)))
        plot_comparison(result, outdir / "compare.png", "dense vs pruned variants on this machine")
        atomic_write(outdir / "compare.md", lambda tmp: Path(tmp).write_text(
            "# prunekit compare\n\n" + comparison_markdown(result) + "\n\n![comparison](compare.png)\n"))
    return outdir / "compare.md"
