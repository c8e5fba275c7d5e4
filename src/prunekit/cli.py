"""The ``prunekit`` command line. Every error exits non-zero with one line on stderr."""

from __future__ import annotations

import argparse
import os
import re
import sys
import types
import typing
import warnings
from pathlib import Path

from prunekit import __version__
from prunekit.flags import add_config_flags, configs_from_args


class CLIError(Exception):
    """A user mistake caught by the CLI itself (bad flag combination, bad value)."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _add_data_args(p: argparse.ArgumentParser, default: str | None = "digits") -> None:
    from_checkpoint = default is None
    p.add_argument("--data", default=default, help="dataset name (`prunekit list datasets`)"
                   + ("; default: the checkpoint's" if from_checkpoint else ""))
    p.add_argument("--data-dir", default=None, help="directory holding the dataset files")
    p.add_argument("--val-fraction", type=float, default=None,
                   help="training fraction held out for validation (default: "
                        + ("the checkpoint's" if from_checkpoint else "0.1") + ")")
    p.add_argument("--limit", type=int, default=None, help="use only the first N training examples")


def _add_trust_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-factory", action="append", default=[], metavar="PACKAGE.MODULE:FUNCTION",
                   help="allow a checkpoint that names this model factory to import and call it (repeat for "
                        "several); without it such a checkpoint is refused and nothing is imported")


def _data_config(args):
    from prunekit.data import DataConfig

    return DataConfig(name=args.data, data_dir=args.data_dir,
                      val_fraction=0.1 if args.val_fraction is None else args.val_fraction, seed=0, limit=args.limit)


def _data_for(args, checkpoint: str | None):
    """The dataset of a command that reads a checkpoint: the checkpoint's own, with every data flag given on top
    (a different ``--data`` starts from that dataset's defaults); ``None`` when neither says anything."""
    from dataclasses import replace

    from prunekit.data import DataConfig
    from prunekit.persistence.checkpoint import read_metadata_if_any

    saved = None
    meta = read_metadata_if_any(checkpoint) if checkpoint is not None else {}
    if meta.get("data") is not None:
        saved = DataConfig.from_dict(meta["data"])
    if args.data is not None and (saved is None or saved.name != args.data):
        return _data_config(args)
    given = {"data_dir": args.data_dir, "val_fraction": args.val_fraction, "limit": args.limit}
    given = {k: v for k, v in given.items() if v is not None}
    if saved is None:
        if given:
            flags = ", ".join("--" + k.replace("_", "-") for k in given)
            raise CLIError(f"{flags} need --data: {checkpoint or 'no checkpoint'} names no dataset")
        return None
    return replace(saved, **given)


class _Parser(argparse.ArgumentParser):
    """No abbreviated flags: ``--iter`` must not silently mean ``--iterations``, nor one method's flag a prefix of
    another's."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


class _MethodParser(_Parser):
    """A ``prunekit prune METHOD`` parser: a misuse (a bad value, a missing --out) is one line."""

    def error(self, message: str) -> typing.NoReturn:
        raise CLIError(message)


def _prune_error(parser: argparse.ArgumentParser, message: str) -> typing.NoReturn:
    match = re.match(r"argument METHOD: invalid choice: '([^']*)'", message)
    if match:
        from prunekit.methods.registry import get_method

        get_method(match.group(1))  # raises the registry's "unknown method ... Did you mean" error
    raise CLIError(message)


def _prune_misuse(args, extras: list[str]) -> str:
    """The one line for flags ``prunekit prune METHOD`` does not take (another method's, or the old form)."""
    if "--config" in extras:
        return "--config replaces the method and its flags: prunekit prune --config recipe.yaml --out DIR"
    if "--method" in extras:
        return "the method is now the first word: prunekit prune METHOD [flags] (e.g. prunekit prune l1 ...), " \
               "not --method METHOD; see CHANGELOG.md for the old flags"
    flags = [a.split("=")[0] for a in extras if a.startswith("--")]
    if args.method is None or not flags:
        return f"unrecognized arguments: {' '.join(extras)}"
    owners = _flag_owners().get(flags[0], [])
    whose = f"it is a flag of {', '.join(owners)}" if owners else "no method has it"
    return f"{flags[0]} does not apply to {args.method} ({whose}); `prunekit prune {args.method} --help` lists its " \
           "flags"


def _flag_owners() -> dict[str, list[str]]:
    from prunekit.flags import flags_of
    from prunekit.methods.registry import get_method, list_methods

    owners: dict[str, list[str]] = {}
    for name in list_methods():
        for flag in flags_of(get_method(name).config):
            owners.setdefault(flag, []).append(name)
    return owners


def _add_job_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("job (every method)")
    g.add_argument("--model", default=None, help="zoo name, package.module:function, or hf:FOLDER (a Hugging Face "
                                                 "sentence encoder with its tokenizer; hf:all-MiniLM-L6-v2 is the "
                                                 "installed pretrained one) (default: the checkpoint's)")
    g.add_argument("--checkpoint", default=None, help="dense weights (.safetensors from prunekit, or a state_dict)")
    _add_data_args(g, default=None)
    _add_trust_arg(g)
    g.add_argument("--out", default=None, help="output folder (recipe, report, one folder per run); required")
    g.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    g.add_argument("--seed", type=int, default=0, help="seed of data order, scoring batches and random choices")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate of the method's training "
                                                          "(fine-tuning, ADMM, DPP; default: the method's, "
                                                          "`prunekit list methods`)")
    g.add_argument("--warmup", type=float, default=None,
                   help="fraction of the method's training steps spent warming the rate up from lr/25 (default: "
                        "the method's; ADMM phases train at a constant rate)")
    g.add_argument("--batch-size", type=int, default=None, help="batch size of the method's training (default 128)")
    g.add_argument("--augment", choices=["auto", "none", "crop", "crop-flip"], default="auto",
                   help="augmentation of the method's training (auto: crop for digits, crop and flip for images)")
    g.add_argument("--distill-steps", type=_positive_int, default=None,
                   help="hf: encoders: steps of embedding distillation towards the dense model after pruning "
                        "(default 300; 0: none)")
    g.add_argument("--distill-lr", type=float, default=None, help="hf: encoders: distillation learning rate "
                                                                  "(default 5e-5)")
    g.add_argument("--no-latency", action="store_true", help="skip the report's latency columns (a latency= target "
                                                             "is still measured: its table and measured speedup)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="prunekit", description="Make trained networks smaller and faster.")
    parser.add_argument("--version", action="version", version=f"prunekit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", help="list models, datasets or methods")
    p.add_argument("what", nargs="?", choices=["models", "datasets", "methods", "all"], default="all")
    p.add_argument("--pattern", default="*", help="wildcard filter, e.g. 'resnet*'")

    p = sub.add_parser("train", help="train a zoo model (best epoch chosen on validation)")
    p.add_argument("--model", required=True, help="zoo model name (`prunekit list models`)")
    _add_data_args(p)
    p.add_argument("--width", type=float, default=1.0, help="width multiplier")
    p.add_argument("--epochs", type=_positive_int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--schedule", choices=["cosine", "step"], default="cosine")
    p.add_argument("--warmup", type=float, default=0.0,
                   help="fraction of the steps spent warming the rate up from lr/25 (default 0)")
    p.add_argument("--augment", choices=["auto", "none", "crop", "crop-flip"], default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output directory (checkpoints, history, plot)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    p = sub.add_parser("prune", help="compress a trained model with a method (`prunekit list methods`), fine-tune, "
                                     "measure, report", description="prunekit prune METHOD [flags]: the method's own "
                       "flags are listed by `prunekit prune METHOD --help`. prunekit prune --config recipe.yaml --out "
                       "DIR runs a recipe (every run writes its own as DIR/recipe.yaml).")
    p.add_argument("--config", default=None, metavar="RECIPE", help="run a whole job from a recipe file (YAML)")
    p.add_argument("--out", dest="recipe_out", default=None, help="with --config: the output folder")
    p.add_argument("--resume", dest="recipe_resume", action="store_true", help="with --config: continue in --out")
    p.add_argument("--trust-factory", dest="recipe_trust", action="append", default=[],
                   metavar="PACKAGE.MODULE:FUNCTION", help="with --config: a model factory the recipe may import")
    p.add_argument("--no-progress", dest="recipe_no_progress", action="store_true", help="with --config")
    p.error = types.MethodType(_prune_error, p)  # a prune misuse is one line, an unknown method names the close ones
    methods = p.add_subparsers(dest="method", metavar="METHOD", parser_class=_MethodParser)
    from prunekit.methods.registry import get_method, list_methods

    for name in list_methods():
        spec = get_method(name)
        m = methods.add_parser(name, help=spec.summary, description=f"{name}: {spec.summary}. Paper: {spec.paper}.")
        _add_job_args(m)
        m.set_defaults(config_fields=add_config_flags(m, spec.config))

    p = sub.add_parser("compare", help="storage and measured speed of pruned variants (sparse vs structured)")
    p.add_argument("dense", help="the dense prunekit checkpoint")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=PATH",
                   help="a pruned checkpoint of the same network (repeat)")
    p.add_argument("--batch", type=_positive_int, default=64, help="batch size of the latency measurements")
    p.add_argument("--min-run-time", type=float, default=0.3, help="seconds per latency measurement")
    p.add_argument("--out", default=None, help="write compare.md and compare.json here")
    p.add_argument("--overwrite", action="store_true", help="replace compare.* files already in --out")
    _add_trust_arg(p)

    p = sub.add_parser("export", help="export a (pruned) checkpoint for deployment")
    p.add_argument("checkpoint", help="a .safetensors checkpoint written by prunekit (dense or pruned), a run folder "
                                      "of prunekit prune, or a pruned Hugging Face folder (RUN/hf)")
    p.add_argument("--onnx", default=None, help="output .onnx path (checked against PyTorch with ONNX Runtime)")
    p.add_argument("--pt2", default=None, help="output torch.export program (.pt2) of the eager inference form")
    p.add_argument("--no-fold", action="store_true", help="keep BatchNorm layers instead of folding them")
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--overwrite", action="store_true", help="replace existing output files (never the checkpoint)")
    _add_trust_arg(p)

    p = sub.add_parser("bench", help="latency of a pruned checkpoint vs dense and vs the uniformly thinned limit "
                                     "(eager and ONNX Runtime)")
    p.add_argument("checkpoint", help="a .safetensors checkpoint written by prunekit, or a run folder of prunekit "
                                      "prune")
    p.add_argument("--dense", default=None, help="the dense checkpoint (default: the unpruned architecture)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64], help="batch sizes")
    p.add_argument("--repeats", type=int, default=5, help="alternated measurements per network (median kept)")
    p.add_argument("--no-onnx", action="store_true", help="eager PyTorch only")
    p.add_argument("--out", default=None, help="write bench.md, bench.json and bench.png here")
    p.add_argument("--overwrite", action="store_true", help="replace bench.* files already in --out")
    _add_trust_arg(p)

    p = sub.add_parser("eval", help="accuracy of a checkpoint on a dataset split")
    p.add_argument("checkpoint", help="a .safetensors checkpoint written by prunekit")
    _add_data_args(p, default=None)
    p.add_argument("--split", choices=["val", "test", "train"], default="test")
    _add_trust_arg(p)

    p = sub.add_parser("inspect", help="per-layer table of a checkpoint or zoo model")
    p.add_argument("target", help="a .safetensors checkpoint, or a zoo model name")
    p.add_argument("--input", default=None, help="CxHxW input for a zoo model name (default 3x32x32)")
    p.add_argument("--classes", type=int, default=None, help="classes of a zoo model name (default 10)")
    p.add_argument("--width", type=float, default=None, help="width multiplier of a zoo model name (default 1)")
    _add_trust_arg(p)

    p = sub.add_parser("demo", help="the main job on the embedded digits data: train, compress, compare")
    p.add_argument("--out", default="demo-report", help="report directory")
    p.add_argument("--epochs", type=_positive_int, default=None, help="training epochs (default: demo's own)")
    p.add_argument("--no-progress", action="store_true")
    return parser


def cmd_list(args) -> None:
    from prunekit.data import DATASETS
    from prunekit.flags import flags_of
    from prunekit.methods.registry import METHODS, get_method, list_methods

    list_methods()  # registers them
    from prunekit.models import MODELS

    sections = {"models": MODELS, "datasets": DATASETS, "methods": METHODS}
    for name, registry in sections.items():
        if args.what not in (name, "all"):
            continue
        print(f"{name}:")
        for entry in registry.list(args.pattern):
            print(f"  {entry:<16} {registry.help(entry)}")
            if registry is METHODS:
                spec = get_method(entry)
                print(f"  {'':<16} paper: {spec.paper}")
                print(f"  {'':<16} config: {spec.config.__name__}: {' '.join(flags_of(spec.config))}")
                print(f"  {'':<16} training: --lr {spec.lr:g} --warmup {spec.warmup:g} unless given")


def cmd_train(args) -> None:
    from prunekit.jobs import default_augment, train_job
    from prunekit.training import TrainConfig

    data = _data_config(args)
    augment = default_augment(args.data) if args.augment == "auto" else args.augment
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
                         weight_decay=args.weight_decay, schedule=args.schedule, warmup=args.warmup, augment=augment,
                         seed=args.seed)
    out = Path(args.out)
    outcome = train_job(args.model, data, config, out, width=args.width, resume=args.resume,
                        progress=not args.no_progress, device=args.device)
    if outcome.checkpoint is not None:  # only the main process writes (and says so) under torchrun
        print(f"saved {outcome.checkpoint}")


def cmd_prune(args) -> None:
    from prunekit.measurement.report import summary_table
    from prunekit.runner import run_recipe

    if args.config is not None:
        if args.method is not None:
            raise CLIError("give either a METHOD with its flags or --config RECIPE, not both")
        recipe = _recipe_from_file(args.config, args.recipe_trust)
        if not args.recipe_out:
            raise CLIError("--config needs --out FOLDER")
        outcome = run_recipe(recipe, out=args.recipe_out, resume=args.recipe_resume,
                             progress=not args.recipe_no_progress)
    else:
        if args.method is None:
            raise CLIError("give a method (`prunekit list methods`), e.g. prunekit prune l1 --checkpoint CK "
                           "--target flops=0.5 --out DIR, or --config recipe.yaml")
        if args.recipe_out or args.recipe_resume or args.recipe_trust or args.recipe_no_progress:
            raise CLIError(f"put --out, --resume, --trust-factory and --no-progress after the method "
                           f"(prunekit prune {args.method} ... --out DIR)")
        if args.out is None:
            raise CLIError(f"--out is required: prunekit prune {args.method} ... --out DIR")
        outcome = run_recipe(_recipe_from_args(args), out=args.out, resume=args.resume,
                             progress=not args.no_progress, model_named_here=True)
    print()
    print(summary_table(outcome.rows))
    print(f"\nreport: {outcome.report}")


def _recipe_from_args(args):
    from prunekit.jobs import default_augment
    from prunekit.methods.registry import get_method
    from prunekit.persistence.recipe import JobConfig, ModelSource, Recipe
    from prunekit.training import TrainConfig

    spec = get_method(args.method)
    configs = configs_from_args(spec.config, args.config_fields, args)
    if args.checkpoint is not None and Path(args.checkpoint).is_dir():
        args.checkpoint = str(_model_file(args.checkpoint))  # a run folder: its compressed model
    from prunekit.data import TEXT_TASKS
    from prunekit.hf_job import is_hf_model

    if args.data is None and is_hf_model(args.model):
        args.data = TEXT_TASKS[0]  # a Hugging Face folder's default task
    data = _data_for(args, args.checkpoint)
    if is_hf_model(args.model) and data.name in TEXT_TASKS:
        given = [flag for flag, value in (("--lr", args.lr), ("--warmup", args.warmup),
                                          ("--batch-size", args.batch_size)) if value is not None]
        given += ["--augment"] if args.augment != "auto" else []
        if given:
            raise CLIError(f"{', '.join(given)} set the method's image training, which a text task does not do; a "
                           "sentence encoder recovers by distillation (--distill-steps, --distill-lr)")
    if args.augment == "auto" and data is None:
        raise CLIError("--augment auto follows the dataset, which the checkpoint does not name; pass --data")
    augment = default_augment(data.name) if args.augment == "auto" else args.augment
    source = ModelSource(model=args.model, checkpoint=args.checkpoint, data=data,
                         trusted_factories=tuple(args.trust_factory))
    train = TrainConfig(epochs=0, lr=spec.lr if args.lr is None else args.lr,
                        warmup=spec.warmup if args.warmup is None else args.warmup,
                        batch_size=128 if args.batch_size is None else args.batch_size,
                        augment=augment)
    distill = None
    if args.distill_steps is not None or args.distill_lr is not None:
        from prunekit.recovery.distill import DistillConfig

        given = {"steps": args.distill_steps, "lr": args.distill_lr}
        distill = DistillConfig(**{k: v for k, v in given.items() if v is not None})
    return Recipe(spec.name, configs, JobConfig(source, train, args.seed, not args.no_latency, distill))


def _recipe_from_file(path: str, trusted: list[str]):
    from dataclasses import replace

    from prunekit.persistence.recipe import Recipe

    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise CLIError(f"cannot read the recipe {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise CLIError(f"the recipe {path} is not UTF-8 text; a recipe is YAML (prunekit writes one as "
                       "OUT/recipe.yaml)") from None
    try:
        recipe = Recipe.from_yaml(text)
    except (TypeError, ValueError) as exc:
        raise CLIError(f"{path}: {exc}") from None
    # a recipe's own trusted_factories are data too: only what this command trusts counts
    source = replace(recipe.job.source, trusted_factories=tuple(trusted))
    return replace(recipe, job=replace(recipe.job, source=source))


def _model_file(path: str, hf: bool = False) -> Path:
    """A checkpoint file, or the model of a run folder (``prunekit prune``'s output); with ``hf`` also a pruned
    Hugging Face folder."""
    from prunekit.runner import model_path

    return model_path(path, hf=hf)


def cmd_export(args) -> None:
    from prunekit.jobs import export_job

    if args.onnx is None and args.pt2 is None:
        raise CLIError("give --onnx PATH and/or --pt2 PATH")
    for line in export_job(_model_file(args.checkpoint, hf=True), onnx=args.onnx, pt2=args.pt2, fold=not args.no_fold,
                           opset=args.opset, overwrite=args.overwrite, trusted_factories=args.trust_factory):
        print(line)


def cmd_bench(args) -> None:
    from prunekit.jobs import bench

    cores = os.cpu_count() or 1
    if args.threads is not None and not 1 <= args.threads <= cores:
        raise CLIError(f"--threads must be 1 to {cores} (this machine's cores), got {args.threads}")
    if any(b < 1 for b in args.batch) or args.repeats < 1:
        raise CLIError(f"--batch sizes and --repeats must be >= 1, got {args.batch} and {args.repeats}")
    dense = _model_file(args.dense) if args.dense else None
    result = bench(_model_file(args.checkpoint), dense_checkpoint=dense, threads=args.threads,
                   batches=tuple(args.batch), repeats=args.repeats, onnx=not args.no_onnx, out=args.out,
                   trusted_factories=args.trust_factory, overwrite=args.overwrite)
    print(result["markdown"])
    if args.out:
        print(f"\nwrote {Path(args.out) / 'bench.md'}, bench.json, bench.png")


def cmd_eval(args) -> None:
    from prunekit.data import load_dataset
    from prunekit.persistence.architecture import load_compressed
    from prunekit.training import evaluate

    args.checkpoint = str(_model_file(args.checkpoint))
    config = _data_for(args, args.checkpoint)
    model, meta = load_compressed(args.checkpoint, args.trust_factory)
    if config is None:
        raise CLIError("the checkpoint names no dataset; pass --data")
    name = config.name
    data = load_dataset(config)
    from prunekit.persistence.architecture import input_shape_of

    expected = input_shape_of(meta["model"])
    classes = meta["model"].get("num_classes", data.num_classes)
    if (data.in_channels, data.input_size, data.input_size) != tuple(expected) or classes != data.num_classes:
        raise CLIError(f"{args.checkpoint} was built for {'x'.join(map(str, expected))} inputs with {classes} "
                       f"classes; {name} has {data.in_channels}x{data.input_size}x{data.input_size} inputs with "
                       f"{data.num_classes} classes")
    result = evaluate(model, getattr(data, args.split))
    print(f"{args.split} accuracy {result['acc']:.4f}  loss {result['loss']:.4f}  ({name}, {args.checkpoint})")


def cmd_inspect(args) -> None:
    from prunekit.measurement.inspect import inspect_table

    target = str(_model_file(args.target)) if Path(args.target).is_dir() else args.target
    is_file = target.endswith(".safetensors") or Path(target).is_file()
    given = [flag for flag, value in (("--input", args.input), ("--classes", args.classes), ("--width", args.width))
             if value is not None]
    if is_file and given:
        raise CLIError(f"{', '.join(given)} describe a zoo model name; a checkpoint brings its own shape")
    print(inspect_table(target, input_spec=args.input or "3x32x32", num_classes=args.classes or 10,
                        width=args.width or 1.0, trusted_factories=args.trust_factory))


def cmd_demo(args) -> None:
    from prunekit.demo import run_demo

    run_demo(args.out, epochs=args.epochs, progress=not args.no_progress)


def cmd_compare(args) -> None:
    from prunekit.measurement.compare import compare_models, comparison_markdown, write_comparison

    variants = {}
    for spec in args.variant:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise CLIError(f"--variant must look like NAME=PATH, got {spec!r}")
        if name in variants or name == "dense":
            raise CLIError(f"--variant name {name!r} is given twice (or is 'dense'); give every variant its own name")
        variants[name] = _model_file(path)
    if not variants:
        raise CLIError("give at least one --variant NAME=PATH to compare with the dense model")
    result = compare_models(_model_file(args.dense), variants, batch=args.batch, min_run_time=args.min_run_time,
                            trusted_factories=args.trust_factory)
    print()
    print(comparison_markdown(result))
    if args.out:
        print(f"\nreport: {write_comparison(result, args.out, args.overwrite)}")


COMMANDS = {"bench": cmd_bench, "compare": cmd_compare, "list": cmd_list, "train": cmd_train, "prune": cmd_prune,
            "export": cmd_export, "eval": cmd_eval, "inspect": cmd_inspect, "demo": cmd_demo}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, extras = parser.parse_known_args(argv)
    except (CLIError, ValueError) as exc:  # a prunekit prune misuse
        print(f"prunekit prune: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    if extras:
        if args.command != "prune":
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
        message = _prune_misuse(args, extras)
        print(f"prunekit prune: error: {message}", file=sys.stderr)
        return 2
    try:
        with warnings.catch_warnings():
            default_show = warnings.showwarning

            def show(message, category, filename, lineno, file=None, line=None):
                if category.__module__.startswith("prunekit"):  # prunekit's own: one plain line
                    print(f"prunekit {args.command}: warning: {' '.join(str(message).split())}", file=sys.stderr)
                else:
                    default_show(message, category, filename, lineno, file, line)

            warnings.showwarning = show
            if getattr(args, "out", None) is not None and not args.out.strip():
                raise CLIError(f"--out must name a folder, got {args.out!r}")
            COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("interrupted; finished epochs are saved (use --resume to continue)", file=sys.stderr)
        return 130
    except (CLIError, ValueError, TypeError, FileNotFoundError, RuntimeError, OSError, ImportError) as exc:
        message = " ".join(str(exc).split()) or exc.__class__.__name__
        print(f"prunekit {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


def _exit_launched(code: int) -> None:
    """Exit a process that torchrun launched without running C++ static destructors: under load, gloo's threads
    are sometimes still joinable at that point and the process aborts ("terminate called without an active
    exception") after all its work is done and saved. Every file is closed by then; streams are flushed here."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    _exit_launched(main())
