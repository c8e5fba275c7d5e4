"""The jobs behind the CLI verbs other than ``prune`` (whose job is :mod:`prunekit.runner`), callable from
Python: ``train_job`` builds, trains, measures and saves; ``bench`` times a compressed network against its dense
one and the uniformly thinned limit; ``export_job`` writes checked ONNX and ``torch.export`` files."""

from __future__ import annotations

import json
import warnings
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.data import DataConfig, DataSplits, load_dataset
from prunekit.distributed import DistContext, finish_distributed, init_distributed
from prunekit.measurement.metrics import ModelSummary, check_latency_settings, summarize
from prunekit.models import ModelConfig, create_model
from prunekit.persistence.checkpoint import atomic_write, save_checkpoint
from prunekit.persistence.outputs import check_output_files, output_dir, output_lock, refuse_existing_run
from prunekit.training import Augment, FitResult, TrainConfig, evaluate, fit


def default_augment(dataset: str) -> Augment:
    """Crop+flip for natural images and clothes; crop only for digits, whose mirror images are other digits."""
    return Augment.CROP if dataset in ("digits", "mnist", "synthetic") else Augment.CROP_FLIP


@dataclass
class TrainOutcome:
    model: nn.Module
    data: DataSplits
    fit: FitResult
    summary: ModelSummary
    checkpoint: Path | None


def train_job(model: str, data: DataConfig, train: TrainConfig, out_dir: str | Path | None = None, *,
              width: float = 1.0, resume: bool = False, progress: bool = True, log=print,
              device: str = "auto", measure_latency: bool = True) -> TrainOutcome:
    """Build a zoo model for ``data``, train it (best on validation), measure it and save ``model.safetensors``.

    Runs unchanged under ``torchrun``: only rank 0 writes files and prints. ``out_dir`` is locked for the whole
    run; without ``resume`` a folder that already holds a run is refused.
    """
    ctx: DistContext = init_distributed(device)
    existing = ("train_state.pt", "model.safetensors")
    if out_dir is not None and not resume:  # every process checks, so that all of them stop together
        refuse_existing_run(output_dir(out_dir), existing, "a training run")
    if out_dir is None or not ctx.is_main:
        outcome = _train(model, data, train, out_dir, width, resume, progress, log, measure_latency, ctx)
    else:
        with output_lock(out_dir) as out:
            if not resume:  # again under the lock: another run may have started in between
                refuse_existing_run(out, existing, "a training run")
            outcome = _train(model, data, train, out_dir, width, resume, progress, log, measure_latency, ctx)
    finish_distributed(ctx)
    return outcome


def _train(model: str, data: DataConfig, train: TrainConfig, out_dir: str | Path | None, width: float, resume: bool,
           progress: bool, log, measure_latency: bool, ctx: DistContext) -> TrainOutcome:
    say = log if ctx.is_main else (lambda *_: None)
    splits = load_dataset(data)
    say(splits.describe())
    torch.manual_seed(train.seed)
    config = ModelConfig(name=model, num_classes=splits.num_classes, in_channels=splits.in_channels,
                         input_size=splits.input_size, width=width)
    net = create_model(config)
    meta: dict[str, Any] = {"model": config.to_dict(), "data": data.to_dict()}
    result = fit(net, splits, train, out_dir, resume=resume, progress=progress, metadata=meta, log=say, ctx=ctx)
    net.to("cpu").eval()
    summary = summarize(net, splits, latency=measure_latency and ctx.is_main)
    if ctx.world_size > 1:  # evaluate() all-reduces, so accuracies are global on every rank
        summary = ModelSummary(**{**summary.to_dict(), "test_acc": evaluate(net, splits.test, ctx=ctx)["acc"]})
    path = None
    if out_dir is not None and ctx.is_main:
        out = Path(out_dir)
        meta.update(train=train.to_dict(), epoch=result.best_epoch, metrics=summary.to_dict())
        path = save_checkpoint(out / "model.safetensors", net, meta)
        atomic_write(out / "history.json", lambda tmp: Path(tmp).write_text(json.dumps(result.history, indent=1)))
        if result.history:
            from prunekit.measurement.plots import plot_history

            plot_history(result.history, out / "training.png", title=f"{model} on {data.name}")
    say(f"best epoch {result.best_epoch}: val acc {summary.val_acc:.4f}, test acc {summary.test_acc:.4f}")
    return TrainOutcome(net, splits, result, summary, path)


def load_dense(model: str | None, checkpoint: str | Path | None, data: DataConfig | None,
               trusted_factories: Collection[str] = (), model_named_here: bool = True
               ) -> tuple[nn.Module, dict[str, Any], DataConfig]:
    """The network to compress and how to rebuild it.

    ``model`` is a zoo name or ``package.module:function`` (a factory given here is trusted when
    ``model_named_here``: the user typed it in this command, not a recipe file); ``checkpoint`` a prunekit
    checkpoint (its metadata names model and data) or, for a user factory, a safetensors / ``torch.save``
    state_dict. A factory not trusted that way nor in ``trusted_factories`` is refused before anything is
    imported.
    """
    from prunekit.persistence.architecture import build_base, check_factory_trusted, load_compressed, load_factory
    from prunekit.persistence.checkpoint import CheckpointError, check_state_fits, load_weights_, read_metadata_if_any

    if model is None and checkpoint is None:
        raise ValueError("give --model (a zoo name or package.module:function) and/or --checkpoint")
    trusted = {*trusted_factories, *([model] if model_named_here and model is not None and ":" in model else [])}
    meta = read_metadata_if_any(checkpoint) if checkpoint is not None else {}
    if meta:
        saved = meta.get("model")
        if saved is None:
            raise CheckpointError(f"{checkpoint}: metadata has no 'model' entry, so no model description; "
                                  "cannot rebuild the network")
        held = saved.get("name", saved.get("factory"))
        if model is not None and model != held:
            raise ValueError(f"--model {model} does not match the checkpoint, which holds {held}")
        net, meta = load_compressed(checkpoint, trusted)
        if data is None and meta.get("data"):
            data = DataConfig.from_dict(meta["data"])
        if data is None:
            raise ValueError("the checkpoint names no dataset; pass --data")
        return net, saved, data
    if data is None:
        raise ValueError("pass --data: the checkpoint does not say which dataset it was trained on")
    if model is None:
        raise ValueError(f"{checkpoint} carries no prunekit metadata; also pass --model")
    splits = load_dataset(data)
    if ":" in model:
        base = {"factory": model, "input_shape": [splits.in_channels, splits.input_size, splits.input_size]}
        check_factory_trusted(base, trusted, "the recipe")
        load_factory(model)
    else:
        base = ModelConfig(name=model, num_classes=splits.num_classes, in_channels=splits.in_channels,
                           input_size=splits.input_size).to_dict()
    net = build_base(base, trusted)
    if checkpoint is not None:
        path = Path(checkpoint)
        if path.suffix == ".safetensors":
            load_weights_(net, path)
        else:
            if not path.is_file():
                raise CheckpointError(f"checkpoint {path} does not exist")
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001 - any failure means an unreadable file
                raise CheckpointError(f"{path} is not a state_dict readable with weights_only=True ({exc})") from None
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state_dict of tensors")
            check_state_fits(net, state, path)
            net.load_state_dict(state)
    return net.eval(), base, data


def width_builder(base: dict[str, Any]):
    """Width multiplier -> a fresh zoo network of ``base``'s architecture (``None`` for a user factory)."""
    if "name" not in base:
        return None
    spec = {k: v for k, v in base.items() if k != "input_shape"}
    full = float(spec.get("width", 1.0))
    return lambda w: create_model(ModelConfig.from_dict({**spec, "width": full * w}))


def bench(checkpoint: str | Path, *, dense_checkpoint: str | Path | None = None, threads: int | None = None,
          batches: tuple[int, ...] = (1, 64), repeats: int = 5, min_run_time: float = 0.2, onnx: bool = True,
          out: str | Path | None = None, log=print, trusted_factories: Collection[str] = (),
          overwrite: bool = False) -> dict[str, Any]:
    """``prunekit bench``: latency of a pruned checkpoint against its dense network and the uniformly thinned
    limit of the same FLOPs, eager and ONNX Runtime, per batch; writes bench.md, bench.json, bench.png to ``out``.

    The dense network is ``dense_checkpoint`` (which must be the network the checkpoint was pruned from) or,
    without it, the unpruned architecture rebuilt from the checkpoint's metadata (weights do not change
    dense-kernel latency).
    """
    from prunekit.measurement.deploy import latency_markdown, measure_against_limit
    from prunekit.persistence.architecture import build_base, check_pruned_from, input_shape_of, load_compressed

    check_latency_settings(min_run_time, threads, batches, repeats)
    if out is not None:
        folder = output_dir(out)
        check_output_files({f"--out ({name})": folder / name for name in ("bench.md", "bench.json", "bench.png")},
                           overwrite=overwrite)
    pruned, meta = load_compressed(checkpoint, trusted_factories)
    base = meta["model"]
    if dense_checkpoint is not None:
        dense, dense_meta = load_compressed(dense_checkpoint, trusted_factories)
        check_pruned_from(dense_meta, meta, str(dense_checkpoint), str(checkpoint), dense)
    else:
        dense = build_base(base, trusted_factories, str(checkpoint))
    shape = input_shape_of(base)
    build = width_builder(base)
    if build is None:
        log("no limit: the network comes from a user factory, which has no width multiplier")
    log(f"measuring {'eager and ONNX Runtime' if onnx else 'eager'} latency at batch {', '.join(map(str, batches))}")
    result = measure_against_limit(pruned, dense, shape, build, threads=threads, batches=batches, repeats=repeats,
                                   min_run_time=min_run_time, onnx=onnx)
    result["checkpoint"] = str(checkpoint)
    text = latency_markdown(result)
    if out is not None:
        with output_lock(out) as out:
            _write_bench(out, checkpoint, result, text)
    result["markdown"] = text
    return result


def _write_bench(out: Path, checkpoint: str | Path, result: dict[str, Any], text: str) -> None:
    from prunekit.measurement.plots import plot_speedups

    atomic_write(out / "bench.json", lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1)))
    atomic_write(out / "bench.md", lambda tmp: Path(tmp).write_text(
        f"# prunekit bench: {checkpoint}\n\n{text}\n\n![speedups](bench.png)\n"))
    plot_speedups(result["rows"], out / "bench.png", title=f"{Path(checkpoint).name}: speedup over dense")


MIN_OPSET, MAX_OPSET = 18, 23  # the opsets torch's dynamo ONNX exporter writes (it falls back to 18 below)


def export_job(checkpoint: str | Path, *, onnx: str | Path | None = None, pt2: str | Path | None = None,
               fold: bool = True, opset: int = 18, atol: float = 1e-4, overwrite: bool = False,
               trusted_factories: Collection[str] = ()) -> list[str]:
    """``prunekit export``: the deployable form of a checkpoint, each output checked against the checkpoint's
    own PyTorch outputs (max abs difference <= ``atol``, else ``RuntimeError`` and nothing is written).

    ONNX: BatchNorm folded, run by ONNX Runtime with all graph optimisations. ``pt2``: a ``torch.export``
    program of the eager inference form (folded; channels-last when it measures faster here). Each file is
    written atomically and only after its check passed. An output may not be the checkpoint itself or the other
    output, nor an existing file unless ``overwrite``. Returns one line per file written.
    """
    from prunekit.measurement.deploy import fold_batchnorm, inference_form
    from prunekit.persistence.architecture import input_shape_of, load_compressed
    from prunekit.persistence.export import check_onnx, export_onnx

    if onnx is None and pt2 is None:
        raise ValueError("give --onnx PATH and/or --pt2 PATH")
    check_output_files({"--onnx": onnx, "--pt2": pt2}, [checkpoint], overwrite=overwrite)
    for flag, path, suffix in (("--onnx", onnx, ".onnx"), ("--pt2", pt2, ".pt2")):
        if path is not None and Path(path).suffix != suffix:
            raise ValueError(f"{flag} {path} must end in {suffix} (ONNX Runtime and torch.export read the format from "
                             "the name)")
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"--opset must be {MIN_OPSET} to {MAX_OPSET} (torch's ONNX exporter), got {opset!r}")
    from prunekit.persistence.huggingface import RECORD
    from prunekit.runner import model_path

    checkpoint = model_path(checkpoint, hf=True)  # a run or job folder: its model
    if (Path(checkpoint) / RECORD).is_file():
        return [_export_hf(Path(checkpoint), onnx, pt2, opset, atol)]
    model, meta = load_compressed(checkpoint, trusted_factories)
    shape = input_shape_of(meta["model"])
    x = torch.randn(4, *shape)
    with torch.no_grad():
        expected = model.eval()(x)
    lines = []
    if onnx is not None:
        deployable, folded = fold_batchnorm(model) if fold else (model, 0)
        diffs: list[float] = []

        def write_onnx(tmp: str) -> None:
            export_onnx(deployable, tmp, shape, opset=opset)
            diffs.append(check_onnx(model, tmp, shape))
            if not diffs[-1] <= atol:
                raise RuntimeError(f"ONNX Runtime outputs differ from PyTorch by {diffs[-1]:.3g} (> {atol:g}); "
                                   f"{onnx} was not written")

        atomic_write(onnx, write_onnx)
        lines.append(f"wrote {onnx} ({folded} BatchNorm folded); ONNX Runtime matches PyTorch (max abs diff "
                     f"{diffs[-1]:.2g})")
    if pt2 is not None:
        form = inference_form(model, shape) if fold else None
        eager = form.model if form is not None else model.eval()
        xin = x.contiguous(memory_format=torch.channels_last) if form is not None and form.channels_last else x
        program = torch.export.export(eager, (xin,), dynamic_shapes=({0: torch.export.Dim("batch", min=1,
                                                                                          max=4096)},))
        diffs = []

        def write_pt2(tmp: str) -> None:
            with warnings.catch_warnings():  # "No complete tensor found in the group": harmless for CPU weights
                warnings.simplefilter("ignore", UserWarning)
                torch.export.save(program, tmp)
            with torch.no_grad():
                diffs.append((torch.export.load(tmp).module()(xin) - expected).abs().max().item())
            if not diffs[-1] <= atol:
                raise RuntimeError(f"the exported program differs from PyTorch by {diffs[-1]:.3g} (> {atol:g}); "
                                   f"{pt2} was not written")

        atomic_write(pt2, write_pt2)
        layout = "" if form is None else (", channels-last" if form.channels_last else ", contiguous") + \
            f" ({form.folded} BatchNorm folded)"
        lines.append(f"wrote {pt2}{layout}; torch.export.load(...).module() matches (max abs diff {diffs[-1]:.2g})")
    return lines


def _export_hf(folder: Path, onnx: str | Path | None, pt2: str | Path | None, opset: int, atol: float) -> str:
    """ONNX of a pruned Hugging Face folder (keyword inputs as recorded, batch and token length dynamic),
    checked with ONNX Runtime on random token ids before it is moved into place."""
    import json

    from prunekit.persistence.export import check_onnx_keywords, export_onnx_keywords
    from prunekit.persistence.huggingface import RECORD, load_pruned, placeholder_inputs

    if pt2 is not None or onnx is None:
        raise ValueError(f"{folder} is a pruned Hugging Face model: give --onnx PATH (--pt2 is for prunekit "
                         "checkpoints)")
    model = load_pruned(folder)
    inputs = placeholder_inputs(json.loads((folder / RECORD).read_text())["inputs"])
    vocab = int(getattr(model.config, "vocab_size", 2))
    gen = torch.Generator().manual_seed(0)
    inputs = {k: torch.randint(0, vocab, v.shape, generator=gen, dtype=v.dtype) if k == "input_ids" else v
              for k, v in inputs.items()}
    diffs: list[float] = []

    def write_onnx(tmp: str) -> None:
        export_onnx_keywords(model, tmp, inputs, opset=opset)
        diffs.append(check_onnx_keywords(model, tmp, inputs))
        if not diffs[-1] <= atol:
            raise RuntimeError(f"ONNX Runtime outputs differ from PyTorch by {diffs[-1]:.3g} (> {atol:g}); {onnx} was "
                               "not written")

    atomic_write(onnx, write_onnx)
    return f"wrote {onnx} ({type(model).__name__}, inputs {', '.join(inputs)}); ONNX Runtime matches PyTorch (max " \
           f"abs diff {diffs[-1]:.2g})"

