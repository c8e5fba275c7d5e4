"""The ``prunekit`` command line. Every error exits non-zero with one line on stderr."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from prunekit import __version__


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prunekit", description="Make trained networks smaller and faster.")
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
    p.add_argument("--augment", choices=["auto", "none", "crop", "crop-flip"], default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output directory (checkpoints, history, plot)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    p = sub.add_parser("prune", help="prune a trained model to a target (channels or eigen-directions), "
                                     "fine-tune, report")
    p.add_argument("--model", default=None, help="zoo name or package.module:function (default: the checkpoint's)")
    p.add_argument("--checkpoint", default=None, help="dense weights (.safetensors from prunekit, or a state_dict)")
    _add_data_args(p, default=None)
    _add_trust_arg(p)
    p.add_argument("--method", default="l1", help="criterion (`prunekit list methods`)")
    p.add_argument("--target", action="append", default=None,
                   help="flops=0.25 | params=0.5 | channels=0.7 | flops=x4; repeat for several targets")
    p.add_argument("--allocation", choices=["global", "uniform"], default="global")
    p.add_argument("--max-per-layer", type=float, default=0.9, help="largest fraction of a layer to remove")
    p.add_argument("--round-to", type=int, default=1, help="keep a multiple of this many channels per pruned layer")
    p.add_argument("--ignore", nargs="*", default=[], help="module names to leave alone (output layer always is)")
    p.add_argument("--iterations", type=int, default=1, help="rounds of prune + fine-tune (1 = one-shot)")
    p.add_argument("--finetune-epochs", type=_positive_int, default=0, help="fine-tuning epochs per round")
    p.add_argument("--lr", type=float, default=0.01, help="fine-tuning learning rate")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--bn-images", type=_positive_int, default=512,
                   help="training images for BatchNorm re-estimation after pruning (0 = off)")
    p.add_argument("--reconstruct-images", type=_positive_int, default=256,
                   help="channel methods: training images for the layer-wise least-squares re-fit of the weights "
                        "against the unpruned network before shrinking (0 = off)")
    p.add_argument("--fisher", choices=["true", "empirical"], default="true",
                   help="curvature methods: labels sampled from the model (true) or the data labels (empirical)")
    p.add_argument("--fisher-batches", type=_positive_int, default=8,
                   help="curvature methods: training batches of 64 the statistics average over")
    p.add_argument("--damping", type=float, default=0.1,
                   help="curvature methods: Tikhonov damping, relative to the factors' mean eigenvalues")
    p.add_argument("--obs-update", choices=["individual", "joint", "none"], default="individual",
                   help="c-obs/kron-obs: weight compensation after removal")
    p.add_argument("--eigen-form", choices=["standard", "depthwise"], default="standard",
                   help="eigendamage: rebuild layers as 1x1-kxk-1x1 (standard) or with a depthwise core")
    p.add_argument("--freeze-rotations", action="store_true",
                   help="eigendamage: do not fine-tune the eigenbasis projections")
    p.add_argument("--pattern", choices=["unstructured", "filter", "channel", "column", "k-of-n", "group"],
                   default="unstructured",
                   help="admm: which weights go together (group: whole coupled channels, removed physically; "
                        "takes --target flops=...)")
    p.add_argument("--quant", default="none", help="admm: none | binary | ternary | bits=N (joint quantization)")
    p.add_argument("--k", type=int, default=None, help="admm k-of-n: weights kept in every run of n")
    p.add_argument("--n", type=int, default=None, help="admm k-of-n: run length")
    p.add_argument("--granularity", choices=["weight", "kernel", "filter"], default="weight",
                   help="dpp: k of n weights per run of a row, kernels per filter, or filters of every coupled "
                        "channel group (removed physically; with --target)")
    p.add_argument("--tiles", type=int, default=None, help="dpp weight granularity: k of n within each of G tiles")
    p.add_argument("--temperature", type=float, nargs=2, default=[1.0, 0.05], metavar=("START", "END"),
                   help="dpp: Gumbel-softmax temperature, annealed per epoch")
    p.add_argument("--init-scale", type=float, default=1.0,
                   help="dpp: logits start at this times log(1 + |w| / mean|w|) (magnitude-informed start)")
    p.add_argument("--anneal-noise", action="store_true", help="dpp: Gumbel noise scale follows the temperature")
    p.add_argument("--logit-lr-scale", type=float, default=1.0, help="dpp: the logits' lr as a multiple of --lr")
    p.add_argument("--admm-epochs", type=int, default=4, help="admm: ADMM epochs per phase")
    p.add_argument("--rho", type=float, default=1e-3, help="admm: initial penalty (grows x1.3 per update)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True,
                   help="output directory (pruned model, report.md/json, plots)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--no-latency", action="store_true", help="skip latency measurement")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("compare", help="storage and measured speed of pruned variants (sparse vs structured)")
    p.add_argument("dense", help="the dense prunekit checkpoint")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=PATH",
                   help="a pruned checkpoint of the same network (repeat)")
    p.add_argument("--batch", type=_positive_int, default=64, help="batch size of the latency measurements")
    p.add_argument("--min-run-time", type=float, default=0.3, help="seconds per latency measurement")
    p.add_argument("--out", default=None, help="write compare.md and compare.json here")
    _add_trust_arg(p)

    p = sub.add_parser("export", help="export a (pruned) checkpoint for deployment")
    p.add_argument("checkpoint", help="a .safetensors checkpoint written by prunekit (dense or pruned)")
    p.add_argument("--onnx", default=None, help="output .onnx path (checked against PyTorch with ONNX Runtime)")
    p.add_argument("--pt2", default=None, help="output torch.export program (.pt2) of the eager inference form")
    p.add_argument("--no-fold", action="store_true", help="keep BatchNorm layers instead of folding them")
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--overwrite", action="store_true", help="replace existing output files (never the checkpoint)")
    _add_trust_arg(p)

    p = sub.add_parser("bench", help="latency of a pruned checkpoint vs dense and vs the uniformly thinned limit "
                                     "(eager and ONNX Runtime)")
    p.add_argument("checkpoint", help="a .safetensors checkpoint written by prunekit")
    p.add_argument("--dense", default=None, help="the dense checkpoint (default: the unpruned architecture)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64], help="batch sizes")
    p.add_argument("--repeats", type=int, default=5, help="alternated measurements per network (median kept)")
    p.add_argument("--no-onnx", action="store_true", help="eager PyTorch only")
    p.add_argument("--out", default=None, help="write bench.md, bench.json and bench.png here")
    _add_trust_arg(p)

    p = sub.add_parser("eval", help="accuracy of a checkpoint on a dataset split")
    p.add_argument("checkpoint", help="a .safetensors checkpoint written by prunekit")
    _add_data_args(p, default=None)
    p.add_argument("--split", choices=["val", "test", "train"], default="test")
    _add_trust_arg(p)

    p = sub.add_parser("inspect", help="per-layer table of a checkpoint or zoo model")
    p.add_argument("target", help="a .safetensors checkpoint, or a zoo model name")
    p.add_argument("--input", default="3x32x32", help="CxHxW input for a zoo model name (default 3x32x32)")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--width", type=float, default=1.0)
    _add_trust_arg(p)

    p = sub.add_parser("demo", help="the main job on the embedded digits data: train, compress, compare")
    p.add_argument("--out", default="demo-report", help="report directory")
    p.add_argument("--epochs", type=_positive_int, default=None, help="training epochs (default: demo's own)")
    p.add_argument("--no-progress", action="store_true")
    return parser


def cmd_list(args) -> None:
    from prunekit.data import DATASETS
    from prunekit.methods.registry import METHODS
    from prunekit.models import MODELS

    sections = {"models": MODELS, "datasets": DATASETS, "methods": METHODS}
    for name, registry in sections.items():
        if args.what not in (name, "all"):
            continue
        print(f"{name}:")
        for entry in registry.list(args.pattern):
            print(f"  {entry:<16} {registry.help(entry)}")


def cmd_train(args) -> None:
    from prunekit.jobs import default_augment, train_job
    from prunekit.training import TrainConfig

    data = _data_config(args)
    augment = default_augment(args.data) if args.augment == "auto" else args.augment
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
                         weight_decay=args.weight_decay, schedule=args.schedule, augment=augment, seed=args.seed)
    out = Path(args.out)
    outcome = train_job(args.model, data, config, out, width=args.width, resume=args.resume,
                        progress=not args.no_progress, device=args.device)
    if outcome.checkpoint is not None:  # only the main process writes (and says so) under torchrun
        print(f"saved {outcome.checkpoint}")


def cmd_prune(args) -> None:
    from prunekit.jobs import prune
    from prunekit.measurement.report import summary_table

    out = Path(args.out)
    data = _data_for(args, args.checkpoint)
    if args.method == "dpp":
        from prunekit.jobs import dpp_job

        if args.granularity == "filter":
            if args.target is None or len(args.target) != 1 or args.k is not None:
                raise CLIError("--method dpp --granularity filter takes one --target (e.g. flops=x4) and no --k: "
                               "every coupled group keeps the same fraction of its filters")
        elif args.target is not None:
            if len(args.target) != 1 or args.k is not None or args.n is not None:
                raise CLIError("--method dpp takes either --k/--n or one --target params=FRACTION (k of n planned "
                               "per layer), not both")
        elif args.k is None:
            raise CLIError("--method dpp needs --k (and --n for weight granularity, or --tiles), or --target "
                           "params=FRACTION")
        if args.finetune_epochs < 1:
            raise CLIError("--method dpp trains masks and weights together: give --finetune-epochs >= 1")
        outcome = dpp_job(args.model, data, checkpoint=args.checkpoint, granularity=args.granularity, k=args.k,
                          n=args.n, tiles=args.tiles, quant=args.quant, epochs=args.finetune_epochs, lr=args.lr,
                          batch_size=args.batch_size, temperature=tuple(args.temperature),
                          mask_options={"init_scale": args.init_scale, "anneal_noise": args.anneal_noise,
                                        "logit_lr_scale": args.logit_lr_scale},
                          target=args.target[0] if args.target else None, out=out,
                          progress=not args.no_progress, measure_latency=not args.no_latency, seed=args.seed,
                          trusted_factories=args.trust_factory)
        print()
        print(summary_table(outcome.rows))
        print(f"\nreport: {outcome.report}")
        return
    if args.method == "admm":
        from prunekit.jobs import admm_job

        targets = args.target or ["params=0.1"]
        if len(targets) != 1:
            raise CLIError("--method admm takes one --target params=FRACTION")
        outcome = admm_job(args.model, data, checkpoint=args.checkpoint, pattern=args.pattern, target=targets[0],
                           k=args.k, n=args.n, quant=args.quant, admm_epochs=args.admm_epochs,
                           retrain_epochs=args.finetune_epochs, rho=args.rho, lr=args.lr,
                           batch_size=args.batch_size, allocation=args.allocation, ignore=tuple(args.ignore),
                           out=out, progress=not args.no_progress, measure_latency=not args.no_latency,
                           seed=args.seed, trusted_factories=args.trust_factory)
        print()
        print(summary_table(outcome.rows))
        print(f"\nreport: {outcome.report}")
        return
    outcome = prune(args.model, data, checkpoint=args.checkpoint, method=args.method,
                    target=args.target or ["flops=0.5"], iterations=args.iterations,
                    finetune_epochs=args.finetune_epochs, lr=args.lr, batch_size=args.batch_size,
                    allocation=args.allocation, max_per_layer=args.max_per_layer, round_to=args.round_to,
                    ignore=tuple(args.ignore),
                    bn_recalibration_images=args.bn_images, reconstruction_images=args.reconstruct_images,
                    out=out, resume=args.resume,
                    progress=not args.no_progress, measure_latency=not args.no_latency, seed=args.seed,
                    curvature={"fisher": args.fisher, "batches": args.fisher_batches, "damping": args.damping,
                               "obs_update": args.obs_update, "seed": args.seed},
                    eigendamage={"form": args.eigen_form, "train_rotations": not args.freeze_rotations},
                    trusted_factories=args.trust_factory)
    print()
    print(summary_table(outcome.rows))
    print(f"\nreport: {outcome.report}")


def cmd_export(args) -> None:
    from prunekit.jobs import export_job

    if args.onnx is None and args.pt2 is None:
        raise CLIError("give --onnx PATH and/or --pt2 PATH")
    for line in export_job(args.checkpoint, onnx=args.onnx, pt2=args.pt2, fold=not args.no_fold, opset=args.opset,
                           overwrite=args.overwrite, trusted_factories=args.trust_factory):
        print(line)


def cmd_bench(args) -> None:
    from prunekit.jobs import bench

    if args.threads is not None and args.threads < 1:
        raise CLIError(f"--threads must be >= 1, got {args.threads}")
    if any(b < 1 for b in args.batch) or args.repeats < 1:
        raise CLIError(f"--batch sizes and --repeats must be >= 1, got {args.batch} and {args.repeats}")
    result = bench(args.checkpoint, dense_checkpoint=args.dense, threads=args.threads, batches=tuple(args.batch),
                   repeats=args.repeats, onnx=not args.no_onnx, out=args.out, trusted_factories=args.trust_factory)
    print(result["markdown"])
    if args.out:
        print(f"\nwrote {Path(args.out) / 'bench.md'}, bench.json, bench.png")


def cmd_eval(args) -> None:
    from prunekit.data import load_dataset
    from prunekit.persistence.architecture import load_compressed
    from prunekit.training import evaluate

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

    print(inspect_table(args.target, input_spec=args.input, num_classes=args.classes, width=args.width,
                        trusted_factories=args.trust_factory))


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
        variants[name] = path
    if not variants:
        raise CLIError("give at least one --variant NAME=PATH to compare with the dense model")
    result = compare_models(args.dense, variants, batch=args.batch, min_run_time=args.min_run_time,
                            trusted_factories=args.trust_factory)
    print()
    print(comparison_markdown(result))
    if args.out:
        print(f"\nreport: {write_comparison(result, args.out)}")


COMMANDS = {"bench": cmd_bench, "compare": cmd_compare, "list": cmd_list, "train": cmd_train, "prune": cmd_prune,
            "export": cmd_export, "eval": cmd_eval, "inspect": cmd_inspect, "demo": cmd_demo}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
