"""The one pruning job every method runs through: load the model source, measure the dense network, apply the
method (its schedule, recovery and fine-tuning, :func:`~prunekit.methods.registry.prune_`), measure, save and
report. The CLI's ``prunekit prune``, ``prunekit.prune_job`` and ``--config recipe.yaml`` all land here.

One output layout for every method::

    OUT/recipe.yaml                the resolved job; `prunekit prune --config OUT/recipe.yaml` re-runs it
    OUT/report.md, report.json     the report (schema prunekit.report/2), plots beside them
    OUT/RUN/run.json               what the run is made of (dense fingerprint, settings), checked on --resume
    OUT/RUN/model.safetensors      the compressed network (weights + replayable architecture changes)
    OUT/RUN/hf/                    instead, for a Hugging Face model (``--model hf:FOLDER``): the pruned
                                   transformers folder (``prunekit.load_pruned``; see :mod:`prunekit.hf_job`)
    OUT/RUN/round_R/, phases/, training/   resumable state of round-based, phased and trained methods

``RUN`` is the run's label (``flops-0.25``; one folder per target). ``--resume`` continues every run after its
last finished round, phase or epoch.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.data import TEXT_TASKS, DataConfig, DataSplits, load_dataset
from prunekit.measurement.formats import encoding_storage
from prunekit.measurement.metrics import summarize
from prunekit.methods.registry import PruneRecord, RunContext, get_method, method_for, prune_
from prunekit.persistence.checkpoint import atomic_write, state_fingerprint
from prunekit.persistence.outputs import locked_output
from prunekit.persistence.recipe import JobConfig, ModelSource, Recipe
from prunekit.recovery.distill import DistillConfig
from prunekit.retrieval import RetrievalConfig, RetrievalData
from prunekit.training import TrainConfig

REPORT_FORMAT = "prunekit.report/2"


@dataclass
class JobRun:
    """One run of a job (one config, usually one target): the compressed model and what was measured."""

    label: str
    config: Any
    record: PruneRecord
    model: nn.Module
    compressed: dict[str, Any]
    storage: dict[str, Any]
    checkpoint: Path | None = None


@dataclass
class JobResult:
    """What :func:`prune_job` returns: the dense measurement and every run."""

    dense: dict[str, Any]
    runs: dict[str, JobRun] = field(default_factory=dict)
    report: Path | None = None
    recipe: Recipe | None = None

    @property
    def rows(self) -> dict[str, dict[str, Any]]:
        """Summary rows for :func:`~prunekit.measurement.report.summary_table`: ``dense`` and each run's label."""
        return {"dense": self.dense, **{label: run.compressed for label, run in self.runs.items()}}


def run_label(config: Any) -> str:
    """The folder name of a run: the target's (``flops-0.25``), or what a config without one keeps
    (``k-of-n-1-of-4``)."""
    target = getattr(config, "target", None)
    if target is not None:
        return target.slug
    label = getattr(config, "label", None)
    text = label() if callable(label) else type(config).__name__
    return text.split(" ", 1)[-1].replace(" ", "-").replace("=", "-")


def prune_job(configs: Any | Sequence[Any], *, model: str | None = None, checkpoint: str | Path | None = None,
              data: str | DataConfig | None = None, train: TrainConfig | None = None, seed: int = 0,
              measure_latency: bool = True, trusted_factories: Sequence[str] = (), out: str | Path | None = None,
              resume: bool = False, progress: bool = True, log: Callable[[str], None] = print,
              distill: DistillConfig | None = None) -> JobResult:
    """Prune a dense network with one method config (or one per target), measure and report.

    Args:
        configs: A method config (``prunekit.L1Config(target="flops=0.25")``) or several of the same method.
        model, checkpoint, data: The dense network (:class:`~prunekit.persistence.recipe.ModelSource`).
        train: Optimiser settings of the method's training (default: the method's learning rate and warm-up,
            ``MethodSpec.lr``/``warmup``, batch 128, the dataset's augmentation).
        out: Output folder (locked for the run; one that holds a run is refused without ``resume``).
        distill: Recovery of a Hugging Face sentence encoder (``model="hf:FOLDER"``) by embedding distillation
            (default ``DistillConfig()``, 300 steps); refused for image models.

    Returns:
        The dense row and every run; with ``out``, also the report's path.
    """
    configs = list(configs) if isinstance(configs, (list, tuple)) else [configs]
    if not configs:
        raise ValueError("give at least one method config, e.g. prunekit.L1Config(target='flops=0.25')")
    spec = method_for(configs[0])
    if any(type(c) is not spec.config for c in configs):
        raise TypeError(f"one job runs one method: every config must be a {spec.config.__name__}")
    data_cfg = DataConfig(name=data) if isinstance(data, str) else data
    source = ModelSource(model=model, checkpoint=str(checkpoint) if checkpoint is not None else None, data=data_cfg,
                         trusted_factories=tuple(trusted_factories))
    job = JobConfig(source=source, train=train, seed=seed, measure_latency=measure_latency, distill=distill)
    return run_recipe(Recipe(spec.name, configs, job), out=out, resume=resume, progress=progress, log=log,
                      model_named_here=True)


# what a job writes at the top of --out, and a training run's files: a fresh job never writes over or beside them
JOB_OUTPUTS = ("report.json", "report.md", "recipe.yaml", "accuracy_vs_flops.png", "*/run.json", "*/round_*",
               "*/phases", "*/training", "*/hf", "model.safetensors", "train_state.pt")


@locked_output("a pruning run", JOB_OUTPUTS)
def run_recipe(recipe: Recipe, *, out: str | Path | None = None, resume: bool = False, progress: bool = True,
               log: Callable[[str], None] = print, model_named_here: bool = False) -> JobResult:
    """Run a :class:`~prunekit.persistence.recipe.Recipe` (see the module docstring for the output layout).

    A recipe is data: a model factory its source names is imported only if ``recipe.job.source.trusted_factories``
    holds it, which a recipe read from a file gets from the command (``--trust-factory``), never from the file;
    ``model_named_here`` says the caller typed the model itself (``prune_job``, ``prunekit prune METHOD --model``).
    """
    from prunekit.hf_job import hf_folder, is_hf_model, load_hf_source, resolved_model
    from prunekit.jobs import default_augment, load_dense

    spec = get_method(recipe.method)
    source, job = recipe.job.source, recipe.job
    torch.manual_seed(job.seed)  # a network built from a zoo name without a checkpoint starts from this seed
    model_name = source.model
    text = is_hf_model(source.model) and (source.data is None or source.data.name in TEXT_TASKS)
    if is_hf_model(source.model):
        hf_folder(source.model)  # a missing folder first: it is the likelier mistake
    if text:
        for config in recipe.configs:  # refused before the (slow) load and dense measurement
            if getattr(config, "reconstruction_images", 0):
                raise ValueError("the least-squares re-fit reads training images, which a text task has none of: "
                                 "pass --reconstruction-images 0 (reconstruction_images=0); a sentence encoder "
                                 "recovers by distillation (--distill-steps)")
            trains = [f for f in ("finetune_epochs", "epochs", "admm_epochs", "retrain_epochs")
                      if getattr(config, f, 0)]
            if trains:
                raise ValueError(f"{spec.name} trains on labelled images ({', '.join(trains)} > 0), which a text task "
                                 "has none of; use a method that prunes without training (l1, taylor, the curvature "
                                 "family, eigendamage) with its fine-tuning epochs at 0, and recover by distillation "
                                 "(--distill-steps)")
    elif job.distill is not None:
        raise ValueError("distillation (--distill-steps, job.distill) recovers a Hugging Face sentence encoder on a "
                         "text task (--model hf:FOLDER --data wordnet-retrieval); an image model recovers by its "
                         "method's fine-tuning (--finetune-epochs)")
    if is_hf_model(source.model):
        dense, base, splits = load_hf_source(source.model, source.checkpoint, source.data)
        data_cfg, model_name = source.data or DataConfig(name="wordnet-retrieval"), resolved_model(source.model)
    else:
        dense, base, data_cfg = load_dense(source.model, source.checkpoint, source.data, source.trusted_factories,
                                           model_named_here)
        splits = load_dataset(data_cfg)
    train = job.train or TrainConfig(epochs=0, lr=spec.lr, warmup=spec.warmup, augment=default_augment(data_cfg.name))
    dense_sha256 = state_fingerprint(dense)
    if source.dense_sha256 is not None and source.dense_sha256 != dense_sha256:
        from prunekit.persistence.checkpoint import CheckpointError

        raise CheckpointError(f"the recipe was written for another dense network (weights sha256 "
                              f"{source.dense_sha256[:12]}..., {source.checkpoint or source.model} has "
                              f"{dense_sha256[:12]}...); give the recipe's network, or drop dense_sha256 from the "
                              "recipe to prune this one")
    checkpoint = str(Path(source.checkpoint).resolve()) if source.checkpoint is not None else None
    distill = (job.distill or DistillConfig()) if text else None  # the default written out: a re-run keeps it
    resolved = Recipe(recipe.method, recipe.configs, JobConfig(
        ModelSource(model_name, checkpoint, data_cfg, (), dense_sha256), train, job.seed, job.measure_latency,
        distill))
    outdir = Path(out) if out is not None else None
    if outdir is not None:
        # everything that can refuse the job is checked before it writes anything
        from prunekit.persistence.runs import check_or_write_manifest

        if resume and not (outdir / "recipe.yaml").is_file():
            from prunekit.persistence.checkpoint import CheckpointError

            raise CheckpointError(f"nothing to resume in {outdir}: it holds no recipe.yaml (the first file a job "
                                  "writes); start without --resume")
        _check_recipe(outdir, resolved, resume)
        for config in resolved.configs:
            check_or_write_manifest(outdir / run_label(config), resume, _manifest(dense_sha256, spec.name, config,
                                                                                  splits.config, train, job.seed),
                                    write=False)
        atomic_write(outdir / "recipe.yaml", lambda tmp: Path(tmp).write_text(
            "# prunekit prune --config THIS_FILE --out FOLDER runs this job again\n" + resolved.to_yaml()))
    try:
        return _run(spec, resolved, dense, base, splits, train, outdir, resume, progress, log)
    except BaseException:
        if outdir is not None and not resume:
            _remove_unstarted(outdir, resolved)
        raise


def _manifest(dense_sha256: str, method: str, config: Any, data: DataConfig | RetrievalConfig, train: TrainConfig,
              seed: int) -> dict[str, Any]:
    """What ``run.json`` records (see :func:`~prunekit.methods.registry.prune_`)."""
    return {"dense_sha256": dense_sha256, "method": method, "config": config.to_dict(), "data": data.to_dict(),
            "train": train.to_dict(), "seed": seed}


def _remove_unstarted(outdir: Path, recipe: Recipe) -> None:
    """After a fresh job failed: remove the run folders that hold nothing but their run record, and the recipe
    when no run kept anything, so the corrected command can use the same --out."""
    kept = False
    for config in recipe.configs:
        folder = outdir / run_label(config)
        if not folder.is_dir():
            continue
        if {p.name for p in folder.iterdir()} <= {"run.json"}:
            (folder / "run.json").unlink(missing_ok=True)
            folder.rmdir()
        else:
            kept = True
    if not kept and not (outdir / "report.json").exists():
        (outdir / "recipe.yaml").unlink(missing_ok=True)


def _run(spec, resolved: Recipe, dense: nn.Module, base: dict[str, Any], splits: DataSplits | RetrievalData,
         train: TrainConfig, outdir: Path | None, resume: bool, progress: bool, log: Callable[[str], None]
         ) -> JobResult:
    from prunekit.hf_job import distill_recovery_, summarize_retrieval

    job = resolved.job
    dense_sha256 = resolved.job.source.dense_sha256
    data_cfg = splits.config
    text = isinstance(splits, RetrievalData)  # a sentence encoder: recall@1 as accuracy, distillation as recovery

    def measure(model: nn.Module) -> dict[str, Any]:
        if text:
            return summarize_retrieval(model, splits, latency=job.measure_latency)
        return summarize(model, splits, latency=job.measure_latency).to_dict()

    log(f"dense: measuring ({splits.describe()})")
    dense_row = measure(dense)
    dense_bits = 32 * sum(p.numel() for p in dense.parameters())
    dense_row["storage_bits"] = dense_bits
    result = JobResult(dense=dense_row, recipe=resolved)
    for config in resolved.configs:
        label = run_label(config)
        folder = outdir / label if outdir is not None else None
        log(f"{spec.name} {label}: pruning")
        net = copy.deepcopy(dense).train(not text)  # a transformer is scored without dropout
        ctx = RunContext(train=train, seed=job.seed, folder=folder, resume=resume, base=base, progress=progress,
                         log=log)
        record = prune_(net, config, splits, ctx)
        recovery = {}
        if text:
            recovery = distill_recovery_(net, dense, splits, job.distill, job.seed, progress, log)
            record.notes.append(f"val/test acc are recall@1 ({splits.describe()}); embedding distillation "
                                f"{recovery['distill_steps']} steps: cosine to the dense embeddings of the validation "
                                f"texts {recovery['fidelity_before_distill']:.3f} -> {recovery['fidelity']:.3f}")
        net.eval()
        row = {**measure(net), **recovery}
        row["nonzero_params"] = int(sum(int((p != 0).sum()) for p in net.parameters()))
        row["val_acc_before_finetune"] = record.val_acc_before_finetune
        row["test_acc_before_finetune"] = record.test_acc_before_finetune
        if record.predicted_speedup is not None:  # a latency= target: measured where it was predicted
            row.update(latency_speedups(dense, net, splits, record, log))
        storage = encoding_storage(net, record.encoding, dense_bits=dense_bits)
        row["storage_bits"] = storage["bits"][storage["best"]]
        run = JobRun(label, config, record, net, row, storage)
        if folder is not None:
            run.checkpoint = _save_run(folder, net, base, record, config, spec.name, splits, row, dense_sha256)
        result.runs[label] = run
    if outdir is not None:
        result.report = write_job_report(outdir, result, base, spec, data_cfg)
    return result


def latency_speedups(dense: nn.Module, net: nn.Module, splits: DataSplits, record, log: Callable[[str], None]
                     ) -> dict[str, Any]:
    """``predicted_speedup`` and ``measured_speedup`` (dense over pruned, in the engine, batch and threads the
    latency target was measured in; the two networks measured in alternation)."""
    from prunekit.measurement.latency_table import measure_speedup

    settings = record.latency_settings
    measured = measure_speedup(dense, net, tuple(splits.example_inputs().shape[1:]), settings)
    log(f"latency ({settings.describe()}): predicted speedup {record.predicted_speedup:.2f}x, measured "
        f"{measured['speedup']:.2f}x")
    return {"predicted_speedup": record.predicted_speedup, "measured_speedup": measured["speedup"],
            "latency_engine": settings.engine.value, "latency_batch": settings.batch,
            "latency_dense_ms": measured["dense_ms"], "latency_pruned_ms": measured["pruned_ms"]}


def _check_recipe(outdir: Path, recipe: Recipe, resume: bool) -> None:
    """On resume, the folder's recipe must be this job's."""
    path = outdir / "recipe.yaml"
    if resume and path.is_file():
        saved = Recipe.from_yaml(path.read_text())
        if saved.to_dict() != recipe.to_dict():
            from prunekit.persistence.checkpoint import CheckpointError

            field, was, now = _first_difference(saved.to_dict(), recipe.to_dict())
            raise CheckpointError(f"cannot resume {outdir}: its recipe.yaml describes another job ({field}: {was!r} "
                                  f"there, {now!r} now); run that recipe (prunekit prune --config {path} --out "
                                  f"{outdir} --resume) or choose another --out")


def _first_difference(a: Any, b: Any, path: str = "") -> tuple[str, Any, Any]:
    """The dotted path of the first place two plain structures differ, and the two values there."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in [*a, *(k for k in b if k not in a)]:
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{path}.{key}" if path else str(key))
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return _first_difference(x, y, f"{path}[{i}]")
    return path or "(the whole recipe)", a, b


def _save_run(folder: Path, net: nn.Module, base: dict[str, Any], record: PruneRecord, config: Any, method: str,
              splits: DataSplits | RetrievalData, row: dict[str, Any], dense_sha256: str) -> Path:
    from prunekit.hf_job import save_hf_run
    from prunekit.measurement.plots import plot_kept_width
    from prunekit.persistence.architecture import save_compressed

    if "hf" in base:  # a transformers folder, reloaded by prunekit.load_pruned
        path = save_hf_run(folder, net, splits, record)
    else:
        path = save_compressed(folder / "model.safetensors", net, base, record.changes, {
            "method": method, "config": config.to_dict(), "data": splits.config.to_dict(),
            "encoding": record.encoding, "dense_sha256": dense_sha256,
            "metrics": {k: v for k, v in row.items() if isinstance(v, (int, float))}})
    if record.kept_width:
        what = "bottleneck rank" if any(isinstance(getattr(m, "rank_out", None), int) for m in net.modules()) \
            else "output channels"
        plot_kept_width(record.kept_width, folder / "kept_width.png", title=f"{method}, {folder.name}: kept {what}")
    for name, draw in record.figures.items():
        draw(folder / name)
    return path


def write_job_report(outdir: Path, result: JobResult, base: dict[str, Any], spec, data: DataConfig) -> Path:
    """``report.json`` (schema ``prunekit.report/2``: the dense row, and per run its compressed row, storage,
    rounds, notes and results) and ``report.md`` with the summary table, notes and figures."""
    from prunekit.measurement.plots import plot_accuracy_vs_flops
    from prunekit.measurement.report import summary_table

    runs = {}
    images = []
    for label, run in result.runs.items():
        runs[label] = {
            "config": run.config.to_dict(), "compressed": run.compressed,
            "storage": {"dense_bits": result.dense["storage_bits"], "compressed_bits": run.compressed["storage_bits"],
                        "format": run.storage["best"], "bits_by_format": run.storage["bits"],
                        "compression": run.storage["compression"], "values": run.storage["values"]},
            "rounds": run.record.rounds, "notes": run.record.notes, "results": run.record.results,
            "encoding": run.record.encoding, "changes": len(run.record.changes),
            "kept_width": {k: list(v) for k, v in run.record.kept_width.items()},
            "model": str(run.checkpoint.relative_to(outdir)) if run.checkpoint else None}
        if run.record.kept_width:
            images.append(f"{label}/kept_width.png")
        images += [f"{label}/{name}" for name in run.record.figures]
    if len(result.runs) > 1:
        plot_accuracy_vs_flops({spec.name: [(r.compressed["flops"] / 1e6, r.compressed["test_acc"])
                                            for r in result.runs.values()]}, outdir / "accuracy_vs_flops.png",
                               dense=(result.dense["flops"] / 1e6, result.dense["test_acc"]),
                               title="test accuracy vs FLOPs")
        images.insert(0, "accuracy_vs_flops.png")
    what = base.get("name", base.get("factory", base.get("hf")))
    title = f"prunekit prune {spec.name}: {what} on {data.name}"
    payload = {"format": REPORT_FORMAT, "title": title, "method": spec.name, "paper": spec.paper,
               "recipe": result.recipe.to_dict() if result.recipe else None, "dense": result.dense, "runs": runs}
    atomic_write(outdir / "report.json", lambda tmp: Path(tmp).write_text(
        json.dumps(payload, indent=2, default=str)))
    md = [f"# {title}", "", f"Method: {spec.name} ({spec.paper}).", "", summary_table(result.rows, markdown=True), ""]
    for label, run in result.runs.items():
        s = runs[label]["storage"]
        md += [f"## {label}", "",
               f"- storage: {s['compressed_bits']:,} bits ({s['format']}, values {s['values']}) against "
               f"{s['dense_bits']:,} dense float32 bits ({s['dense_bits'] / s['compressed_bits']:.1f}x)"]
        md += [f"- {note}" for note in run.record.notes] + [""]
    md += [f"![{Path(i).stem}]({i})" for i in images]
    atomic_write(outdir / "report.md", lambda tmp: Path(tmp).write_text("\n".join(md) + "\n"))
    return outdir / "report.md"


def model_path(path: str | Path, hf: bool = False) -> Path:
    """A checkpoint file as given, or the compressed model of a run folder: ``RUN/model.safetensors``, or for a
    job's output folder, the model of its only run. With ``hf``, a pruned Hugging Face folder (``RUN/hf``) is
    returned too.

    Raises:
        ValueError: a folder with several runs (the message lists them) or none; a pruned Hugging Face model
            without ``hf``.
    """
    from prunekit.hf_job import pruned_hf_folder

    path = Path(path)
    if not path.is_dir():
        return path
    encoder = pruned_hf_folder(path)
    if encoder is not None:
        if hf:
            return encoder
        raise ValueError(f"{encoder} is a pruned Hugging Face model: `prunekit export {encoder} --onnx FILE` "
                         "and prunekit.load_pruned read it; this command reads prunekit checkpoints")
    if (path / "model.safetensors").is_file():
        return path / "model.safetensors"
    runs = sorted(p.parent.name for p in path.glob("*/model.safetensors"))
    if len(runs) == 1:
        return path / runs[0] / "model.safetensors"
    if runs:
        raise ValueError(f"{path} holds {len(runs)} runs ({', '.join(runs)}); give one of them, e.g. "
                         f"{path / runs[0]}")
    raise ValueError(f"{path} is a folder without a model.safetensors or a finished run")
