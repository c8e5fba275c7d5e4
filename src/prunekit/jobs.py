"""The jobs behind the CLI verbs, callable from Python: ``train_job`` builds, trains, measures and saves."""

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
from prunekit.persistence.outputs import check_output_files, locked_output, output_dir, output_lock, refuse_existing_run
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
               trusted_factories: Collection[str] = ()) -> tuple[nn.Module, dict[str, Any], DataConfig]:
    """The network to compress and how to rebuild it.

    ``model`` is a zoo name or ``package.module:function`` (a factory given here is trusted: the user asked for
    it); ``checkpoint`` a prunekit checkpoint (its metadata names model and data) or, for a user factory, a
    safetensors / ``torch.save`` state_dict. A checkpoint naming any factory not in ``trusted_factories`` (or
    ``model``) is refused before anything is imported.
    """
    from prunekit.persistence.architecture import build_base, load_compressed, load_factory
    from prunekit.persistence.checkpoint import CheckpointError, check_state_fits, load_weights_, read_metadata_if_any

    if model is None and checkpoint is None:
        raise ValueError("give --model (a zoo name or package.module:function) and/or --checkpoint")
    trusted = {*trusted_factories, *([model] if model is not None and ":" in model else [])}
    meta = read_metadata_if_any(checkpoint) if checkpoint is not None else {}
    if meta:
        saved = meta.get("model")
        if saved is None:
            raise CheckpointError(f"{checkpoint}: metadata has no model description; cannot rebuild the network")
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
        load_factory(model)
        base = {"factory": model, "input_shape": [splits.in_channels, splits.input_size, splits.input_size]}
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


@dataclass
class PruneOutcome:
    """What :func:`prune` returns: measured rows (dense and each target) and the pruned models."""

    rows: dict[str, dict[str, Any]]
    results: dict[str, Any]
    report: Path | None


@locked_output("a pruning run", ("report.json", "*/round_*"))
def prune(model: str | None = None, data: str | DataConfig | None = None, *, checkpoint: str | Path | None = None,
          method: str = "l1", target: str | list[str] = "flops=0.5", iterations: int = 1,
          finetune_epochs: int = 0, lr: float = 0.01, batch_size: int = 128, allocation: str = "global",
          max_per_layer: float = 0.9, round_to: int = 1, ignore: tuple[str, ...] = (),
          bn_recalibration_images: int = 512, reconstruction_images: int = 256,
          out: str | Path | None = None, resume: bool = False, progress: bool = True, log=print,
          measure_latency: bool = True, seed: int = 0, curvature: dict | None = None,
          eigendamage: dict | None = None, trusted_factories: Collection[str] = ()) -> PruneOutcome:
    """Prune a dense network to one or several targets, fine-tune, measure and report (``prunekit prune``).

    Each target starts from the dense model; with ``out`` every target gets ``out/<target>/`` (pruned model,
    rounds) and ``out`` gets ``report.md``, ``report.json`` and plots. ``report.json["pruned"]`` is the last target.
    ``curvature`` and ``eigendamage`` are the fields of :class:`~prunekit.curvature.kfac.CurvatureConfig` and
    :class:`~prunekit.methods.eigendamage.EigenDamageConfig` (e.g. ``curvature={"fisher": "empirical"}``).
    ``out`` is locked for the whole run; without ``resume`` a folder that already holds a run is refused.
    ``trusted_factories``: see :func:`load_dense`.
    """
    import copy

    from prunekit.measurement.plots import plot_accuracy_vs_flops, plot_kept_width
    from prunekit.measurement.report import write_report
    from prunekit.methods.channel import PruneConfig, prune_model
    from prunekit.planning.allocation import AllocationConfig

    data_cfg = DataConfig(name=data) if isinstance(data, str) else data
    dense, base, data_cfg = load_dense(model, checkpoint, data_cfg, trusted_factories)
    splits = load_dataset(data_cfg)
    targets = [target] if isinstance(target, str) else list(target)
    if not targets:
        raise ValueError("give at least one --target, e.g. flops=0.25")
    configs = [PruneConfig(method=method, target=t, iterations=iterations, ignore=tuple(ignore), seed=seed,
                           allocation=AllocationConfig(allocation, max_per_layer, round_to=round_to),
                           bn_recalibration_images=bn_recalibration_images,
                           reconstruction_images=reconstruction_images, curvature=dict(curvature or {}),
                           eigendamage=dict(eigendamage or {})) for t in targets]
    finetune = TrainConfig(epochs=finetune_epochs, lr=lr, batch_size=batch_size, seed=seed,
                           augment=default_augment(data_cfg.name)) if finetune_epochs > 0 else None
    log(f"dense: measuring ({splits.describe()})")
    rows = {"dense": summarize(dense, splits, latency=measure_latency).to_dict()}
    results = {}
    outdir = Path(out) if out is not None else None
    kept_what = "bottleneck rank" if method == "eigendamage" else "output channels"
    for cfg in configs:
        slug = str(cfg.target).replace("=", "-")
        log(f"pruning with {method} to {cfg.target} ({iterations} round(s), {finetune_epochs} fine-tune epochs each)")
        net = copy.deepcopy(dense).train()
        result = prune_model(net, splits, cfg, finetune, outdir / slug if outdir else None, base=base,
                             resume=resume, progress=progress, log=log)
        summary = summarize(result.model.eval(), splits, latency=measure_latency).to_dict()
        summary["val_acc_before_finetune"] = result.val_acc_before_finetune
        summary["test_acc_before_finetune"] = result.test_acc_before_finetune
        results[str(cfg.target)] = result
        rows[f"pruned {cfg.target}"] = summary
        if outdir is not None:
            plot_kept_width(result.kept_width, outdir / f"kept_width_{slug}.png",
                            title=f"{method}, {cfg.target}: kept {kept_what} per layer")
    last = list(rows)[-1]
    report = None
    if outdir is not None:
        images = [f"kept_width_{str(c.target).replace('=', '-')}.png" for c in configs]
        if len(configs) > 1:
            plot_accuracy_vs_flops({method: [(rows[k]["flops"] / 1e6, rows[k]["test_acc"]) for k in rows
                                             if k != "dense"]}, outdir / "accuracy_vs_flops.png",
                                   dense=(rows["dense"]["flops"] / 1e6, rows["dense"]["test_acc"]),
                                   title="test accuracy vs FLOPs")
            images.insert(0, "accuracy_vs_flops.png")
        notes = [f"method {method}, allocation {allocation} (max {max_per_layer:.0%} of a layer), {iterations} "
                 f"round(s), {finetune_epochs} fine-tune epoch(s) per round, model chosen on validation",
                 "accuracy right after pruning: after the least-squares re-fit (channel methods) and BatchNorm "
                 "re-estimation, before any training"]
        notes += [f"{k}: accuracy right after pruning (val) {r.get('val_acc_before_finetune'):.4f}"
                  for k, r in rows.items() if r.get("val_acc_before_finetune") is not None]
        report = write_report(
            outdir, f"prunekit prune: {base.get('name', base.get('factory'))} on {data_cfg.name}",
            {"dense": rows["dense"], **{k: v for k, v in rows.items() if k != "dense"}},
            extra={"pruned": rows[last], "config": [c.to_dict() for c in configs], "data": data_cfg.to_dict(),
                   "finetune": finetune.to_dict() if finetune else None,
                   "models": {str(c.target): str(outdir / str(c.target).replace("=", "-") / f"round_{iterations}"
                                                  / "pruned.safetensors") for c in configs},
                   "rounds": {k: [vars(x) for x in r.rounds] for k, r in results.items()}},
            notes=notes, images=images)
    return PruneOutcome(rows, results, report)


@locked_output("an ADMM run", ("report.json", "admm.safetensors"), resumable=False)
def admm_job(model: str | None = None, data: str | DataConfig | None = None, *, checkpoint: str | Path | None = None,
             pattern: str = "unstructured", target: str = "params=0.1", k: int | None = None, n: int | None = None,
             quant: str = "none", admm_epochs: int = 4, retrain_epochs: int = 4, rho: float = 1e-3,
             lr: float = 0.01, batch_size: int = 128, allocation: str = "global", ignore: tuple[str, ...] = (),
             out: str | Path | None = None, progress: bool = True, log=print, measure_latency: bool = True,
             seed: int = 0, trusted_factories: Collection[str] = ()) -> PruneOutcome:
    """ADMM pruning (and quantization) of a dense network with retraining, measured and reported with the exact
    storage of every compressed format (``prunekit prune --method admm``).

    ``target`` is ``params=FRACTION`` (or ``params=xFACTOR``): the fraction of the constrained weights kept
    (ignored for the k-of-n pattern, which keeps ``k / n``). The group pattern also takes ``flops=...`` and
    ``channels=...``: the fraction of the whole model's FLOPs (params, channels) it keeps.
    """
    from prunekit.measurement.report import write_report
    from prunekit.methods.admm import ADMMConfig, admm_prune_, storage_report
    from prunekit.persistence.architecture import save_compressed
    from prunekit.planning.allocation import Target

    parsed = Target.parse(target)
    if parsed.metric.value != "params" and pattern != "group":
        raise ValueError(f"ADMM targets the fraction of weights kept: give params=0.02 or params=x50 (flops=... "
                         f"needs --pattern group), got {target!r}")
    config = ADMMConfig(pattern=pattern, keep=parsed.keep, k=k, n=n, quant=quant, rho=rho, admm_epochs=admm_epochs,
                        retrain_epochs=retrain_epochs, allocation=allocation, ignore=tuple(ignore),
                        group_metric=parsed.metric)
    data_cfg = DataConfig(name=data) if isinstance(data, str) else data
    dense, base, data_cfg = load_dense(model, checkpoint, data_cfg, trusted_factories)
    splits = load_dataset(data_cfg)
    train = TrainConfig(epochs=1, lr=lr, batch_size=batch_size, seed=seed, augment=default_augment(data_cfg.name))
    log(f"dense: measuring ({splits.describe()})")
    rows = {"dense": summarize(dense, splits, latency=measure_latency).to_dict()}
    import copy

    net = copy.deepcopy(dense).train()
    torch.manual_seed(seed)
    result = admm_prune_(net, splits, config, train, progress=progress, log=log)
    removed_channels, changes = 0, []
    if result.change is not None:  # group pattern: the coupled channels are already gone
        removed_channels, changes = sum(len(v) for v in result.change["removed"].values()), [result.change]
    elif config.pattern.value in ("filter", "channel"):  # structured zeros leave the model physically where exact
        from prunekit.methods.admm import shrink_zero_channels_

        plan = shrink_zero_channels_(net.eval(), splits.train[:2][0])
        removed_channels, changes = plan.num_removed(), ([plan.to_dict()] if plan else [])
        log(f"removed {removed_channels} all-zero channels physically (exact, verified against masking)")
    net.eval()
    summary = summarize(net, splits, latency=measure_latency).to_dict()
    summary["nonzero_params"] = int(sum(int((p != 0).sum()) for p in net.parameters()))
    summary["removed_channels"] = removed_channels
    storage = storage_report(net, result, config)
    summary["storage_bits"] = storage["bits"][storage["best"]]
    label = f"admm {config.pattern.value} {target}" + (f" {config.quant}" if str(config.quant) != "none" else "")
    rows[label] = summary
    report = None
    if out is not None:
        outdir = Path(out)
        path = save_compressed(outdir / "admm.safetensors", net, base, changes,
                               {"admm": config.to_dict(), "scales": result.scales, "data": data_cfg.to_dict()})
        notes = [f"ADMM {config.admm_epochs} epoch(s) per phase, rho {config.rho:g} x{config.rho_growth:g} per "
                 f"update, then {config.retrain_epochs} masked retraining epoch(s); model chosen on validation",
                 f"kept {result.kept_fraction():.4f} of the constrained weights "
                 f"({1 / max(result.kept_fraction(), 1e-12):.1f}x); values stored as {storage['values']}",
                 "storage (weights + indices + scales, bits): " + ", ".join(
                     f"{f} {b:,} ({storage['compression'][f]:.1f}x)" for f, b in storage["bits"].items()),
                 f"storage KiB in the table: the smallest format ({storage['best']}); params counts every entry, "
                 f"{summary['nonzero_params']:,} of them nonzero"]
        report = write_report(outdir, f"prunekit prune --method admm: {base.get('name', base.get('factory'))} on "
                              f"{data_cfg.name}", rows,
                              extra={"pruned": summary, "storage": storage, "admm": config.to_dict(),
                                     "rates": result.rates, "residuals": result.residuals,
                                     "history": result.history, "model_path": str(path)},
                              notes=notes)
    return PruneOutcome(rows, {label: result}, report)


@locked_output("a DPP run", ("report.json", "dpp.safetensors"), resumable=False)
def dpp_job(model: str | None = None, data: str | DataConfig | None = None, *, checkpoint: str | Path | None = None,
            granularity: str = "weight", k: int = 1, n: int | None = 4, tiles: int | None = None,
            quant: str = "none", epochs: int = 4, lr: float = 0.01, batch_size: int = 128,
            temperature: tuple[float, float] = (1.0, 0.05), target: str | None = None,
            out: str | Path | None = None, progress: bool = True, log=print, measure_latency: bool = True,
            seed: int = 0, mask_options: dict[str, Any] | None = None,
            trusted_factories: Collection[str] = ()) -> PruneOutcome:
    """DPP: learn k-of-n masks (optionally with quantized weights) on a dense network, measure and report, with the
    exact k-of-n storage, the per-layer confidence/diversity plot and the model (``prunekit prune --method dpp``).

    ``granularity="filter"`` learns which filters of every coupled channel group to keep (``target``, e.g.
    ``flops=x4``, sets how many) and removes the rest physically (:mod:`prunekit.methods.dpp_filters`). With weight
    granularity a ``params=F`` target (instead of ``k``/``n``) keeps about ``F`` of the weights: layers under 2% of
    them stay dense and every other layer gets its own k-of-n (:func:`prunekit.methods.dpp.plan_k_of_n`).
    ``mask_options`` are further :class:`prunekit.methods.dpp.DPPConfig` fields (``init_scale``, ``noise_scale``,
    ``anneal_noise``, ``logit_lr_scale``, ``entropy_weight``)."""
    import copy

    from prunekit.measurement.plots import plot_mask_metrics
    from prunekit.measurement.report import write_report
    from prunekit.methods.admm import format_storage
    from prunekit.methods.dpp import DPPConfig, TemperatureSchedule, dpp_prune_, ste_quantizer
    from prunekit.persistence.architecture import save_compressed
    from prunekit.planning.allocation import Target

    ste_quantizer(quant)  # refuse a bad quantization before any work
    schedule = TemperatureSchedule(temperature[0], temperature[1], max(epochs, 1))
    filters = granularity == "filter"
    if filters:
        from prunekit.methods.dpp_filters import dpp_filter_prune_

        if target is None:
            raise ValueError("DPP filter granularity needs a target (e.g. flops=x4): each coupled group keeps the "
                             "same fraction of its filters, so k follows from the target")
        if quant != "none":
            raise ValueError("DPP filter granularity trains float weights; quantize with --granularity weight|kernel")
        parsed = Target.parse(target)
        config = DPPConfig(granularity="weight", k=1, n=2, temperature=schedule,  # schedule and mask options only
                           **(mask_options or {}))
    elif target is not None:
        parsed = Target.parse(target)
        if granularity != "weight" or tiles or parsed.metric.value != "params":
            raise ValueError("a DPP target plans k of n per layer for weight granularity without tiles and must be "
                             f"params=FRACTION (e.g. params=0.1 keeps a tenth of the weights), got {target!r}")
    else:
        config = DPPConfig(granularity=granularity, k=k, n=n if granularity == "weight" and not tiles else None,
                           tiles=tiles, temperature=schedule, **(mask_options or {}))
    data_cfg = DataConfig(name=data) if isinstance(data, str) else data
    dense, base, data_cfg = load_dense(model, checkpoint, data_cfg, trusted_factories)
    planned: dict[str, tuple[int, int]] | None = None
    if target is not None and not filters:
        from prunekit.methods.dpp import plan_k_of_n

        layers = {name: m.weight.shape for name, m in dense.named_modules()
                  if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and getattr(m, "groups", 1) == 1}
        planned = plan_k_of_n(layers, 1 - parsed.keep)
        k, n = next(iter(planned.values()))
        config = DPPConfig(k=k, n=n, temperature=schedule, **(mask_options or {}))
        log("k of n per layer: " + ", ".join(f"{name} {k_}/{n_}" for name, (k_, n_) in planned.items()))
    splits = load_dataset(data_cfg)
    train = TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, augment=default_augment(data_cfg.name))
    log(f"dense: measuring ({splits.describe()})")
    rows = {"dense": summarize(dense, splits, latency=measure_latency).to_dict()}
    net = copy.deepcopy(dense).train()
    torch.manual_seed(seed)
    changes: list[dict] = []
    if filters:
        result = dpp_filter_prune_(net, splits, parsed, config, train, progress=progress)
        changes = [result.plan.to_dict()]
        log(f"removed {result.plan.num_removed()} coupled channels physically")
    else:
        result = dpp_prune_(net, splits, config, train, quant=quant, progress=progress,
                            layers=list(planned) if planned else None,
                            per_layer={name: DPPConfig(k=k_, n=n_, temperature=schedule, **(mask_options or {}))
                                       for name, (k_, n_) in planned.items()} if planned else None)
    net.eval()
    summary = summarize(net, splits, latency=measure_latency).to_dict()
    summary["nonzero_params"] = int(sum(int((p != 0).sum()) for p in net.parameters()))
    run_n = (config.n or 0) if granularity == "weight" else None
    if tiles:
        run_n = None
    masked_layers = [] if filters else list(result.masks)
    storage = format_storage(net, masked_layers, None, None, planned or ((k, run_n) if run_n else None),
                             dense_bits=32 * sum(p.numel() for p in dense.parameters()))
    summary["storage_bits"] = storage["bits"][storage["best"]]
    label = f"dpp filter {target}" if filters else f"dpp weight k-of-n {target}" if planned else \
        f"dpp {granularity} {k}-of-{n if run_n else 'n'}"
    label += f" {quant}" if quant != "none" and not filters else ""
    rows[label] = summary
    report = None
    if out is not None:
        outdir = Path(out)
        outdir.mkdir(parents=True, exist_ok=True)
        path = save_compressed(outdir / "dpp.safetensors", net, base, changes,
                               {"dpp": config.to_dict(), "quant": quant, "data": data_cfg.to_dict()})
        plot_mask_metrics(result.metrics, outdir / "mask_metrics.png", title=label)
        last = result.metrics[-1] if result.metrics else {}
        notes = [f"{epochs} epoch(s) of joint mask + weight training, temperature {temperature[0]:g} -> "
                 f"{temperature[1]:g} (exponential, per epoch); model chosen on validation",
                 "storage (bits): " + ", ".join(f"{f} {b:,} ({storage['compression'][f]:.1f}x)"
                                                for f, b in storage["bits"].items()),
                 "final mask confidence / diversity per layer: " + ", ".join(
                     f"{name} {last.get(name + '/confidence', float('nan')):.2f} / "
                     f"{last.get(name + '/diversity', float('nan')):.2f}"
                     for name in (result.kept if filters else result.masks))]
        if planned:
            notes.append("k of n per layer (layers under 2% of the weights stay dense): " + ", ".join(
                f"{name} {k_}/{n_}" for name, (k_, n_) in planned.items()))
        if filters:
            notes.append("filters kept per coupled group (k of n): " + ", ".join(
                f"{r} {k_}/{n_}" for r, (k_, n_) in result.kept.items()) + "; the rest were removed physically")
        report = write_report(outdir, f"prunekit prune --method dpp: {base.get('name', base.get('factory'))} on "
                              f"{data_cfg.name}", rows,
                              extra={"pruned": summary, "storage": storage, "dpp": config.to_dict(),
                                     "metrics": result.metrics, "history": result.history,
                                     "model_path": str(path)},
                              notes=notes, images=["mask_metrics.png"])
    return PruneOutcome(rows, {label: result}, report)


def width_builder(base: dict[str, Any]):
    """Width multiplier -> a fresh zoo network of ``base``'s architecture (``None`` for a user factory)."""
    if "name" not in base:
        return None
    spec = {k: v for k, v in base.items() if k != "input_shape"}
    full = float(spec.get("width", 1.0))
    return lambda w: create_model(ModelConfig.from_dict({**spec, "width": full * w}))


def bench(checkpoint: str | Path, *, dense_checkpoint: str | Path | None = None, threads: int | None = None,
          batches: tuple[int, ...] = (1, 64), repeats: int = 5, min_run_time: float = 0.2, onnx: bool = True,
          out: str | Path | None = None, log=print, trusted_factories: Collection[str] = ()) -> dict[str, Any]:
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
        output_dir(out)
    pruned, meta = load_compressed(checkpoint, trusted_factories)
    base = meta["model"]
    if dense_checkpoint is not None:
        dense, dense_meta = load_compressed(dense_checkpoint, trusted_factories)
        check_pruned_from(dense_meta, meta, str(dense_checkpoint), str(checkpoint))
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
