"""A sentence-retrieval task as the data a pruning method reads: what makes a text encoder prunable through
``prunekit.prune_`` like an image classifier.

The model is an :class:`~prunekit.models.sentence.InBatchRetrieval` around a sentence encoder: given a batch of
(query, document) pairs it scores every query against every document, and row ``i``'s target is ``i``. So the
data-driven criteria (Taylor), the curvature statistics (K-FAC, with labels sampled from each row's softmax for
the true Fisher) and the engine's tracing all work unchanged. Accuracy is recall@1 of each held-out query's own
document among all documents of the split (:func:`prunekit.text.retrieval_metrics`).

:class:`RetrievalData` offers what a method reads of :class:`~prunekit.data.DataSplits`: ``example_inputs``,
``flops_inputs``, ``scoring_batches`` and ``accuracy``. It has no images, so a method's least-squares re-fit
(``reconstruction_images``) and fine-tuning are not available on it; BatchNorm re-estimation has nothing to do.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.configs import Config
from prunekit.models.sentence import embed, tokenize
from prunekit.text import WORDNET_DIR, RetrievalPairs, definition_example_pairs, retrieval_metrics


@dataclass(frozen=True)
class RetrievalConfig(Config):
    """How the WordNet definition -> example task is cut and batched.

    Args:
        eval_fraction: Share of synsets held out as the test pairs (stable hash of the synset).
        val_pairs: Training pairs set aside for validation (selection never looks at the test pairs).
        batch_size: Pairs per scoring batch (each query's negatives are the batch's other documents).
        max_length: Tokens a text is cut at.
    """

    name: str = "wordnet-retrieval"
    eval_fraction: float = 0.25
    val_pairs: int = 1000
    batch_size: int = 32
    max_length: int = 64

    def __post_init__(self) -> None:
        for field in ("val_pairs", "batch_size", "max_length"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 2:
                raise ValueError(f"RetrievalConfig.{field} must be an int >= 2, got {value!r}")



class RetrievalData:
    """Tokenized (query, document) pairs split into train / val / test, read by pruning methods."""

    def __init__(self, tokenizer, train: RetrievalPairs, val: RetrievalPairs, test: RetrievalPairs,
                 config: RetrievalConfig = RetrievalConfig()) -> None:
        for name, pairs in (("train", train), ("val", val), ("test", test)):
            if len(pairs) < 2:
                raise ValueError(f"the {name} split needs at least 2 pairs, got {len(pairs)}")
        self.tokenizer, self.train, self.val, self.test, self.config = tokenizer, train, val, test, config

    def describe(self) -> str:
        return (f"{self.config.name}: {len(self.train)} train / {len(self.val)} val / {len(self.test)} test pairs, "
                f"recall@1 over each split's documents")

    def _batch(self, pairs: RetrievalPairs, idx: list[int]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        n = self.config.max_length
        return (tokenize(self.tokenizer, [pairs.queries[i] for i in idx], n),
                tokenize(self.tokenizer, [pairs.docs[i] for i in idx], n))

    def example_inputs(self, n: int = 2) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The first ``n`` training pairs as ``(queries, documents)`` keyword inputs."""
        return self._batch(self.train, list(range(n)))

    def flops_inputs(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """What FLOPs are counted on: one training pair, each text padded to ``max_length`` tokens (so the count
        does not depend on how short the first pair happens to be)."""
        n = self.config.max_length

        def padded(text: str) -> dict[str, torch.Tensor]:
            batch = self.tokenizer([text], padding="max_length", truncation=True, max_length=n, return_tensors="pt")
            return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

        return padded(self.train.queries[0]), padded(self.train.docs[0])

    def scoring_batches(self, count: int, seed: int) -> Iterator[tuple[Any, torch.Tensor]]:
        """``count`` shuffled batches of ``batch_size`` training pairs: ``((queries, documents), arange)``."""
        order = torch.randperm(len(self.train), generator=torch.Generator().manual_seed(seed)).tolist()
        size = self.config.batch_size
        for b in range(min(count, len(order) // size)):
            yield self._batch(self.train, order[b * size:(b + 1) * size]), torch.arange(size)

    def accuracy(self, model: nn.Module, split: str) -> float:
        """Recall@1 of ``model`` (an ``InBatchRetrieval``) on the ``"val"`` or ``"test"`` pairs."""
        return self.metrics(model, split)["recall@1"]

    def metrics(self, model: nn.Module, split: str) -> dict[str, float]:
        """Recall@1 and MRR on a split, each query against every document of it."""
        pairs = {"val": self.val, "test": self.test}[split]
        encoder = getattr(model, "encoder", model)
        return retrieval_metrics(embed(encoder, self.tokenizer, pairs.queries, max_length=self.config.max_length),
                                 embed(encoder, self.tokenizer, pairs.docs, max_length=self.config.max_length))


def wordnet_retrieval(tokenizer, directory: str | Path = WORDNET_DIR,
                      config: RetrievalConfig = RetrievalConfig()) -> RetrievalData:
    """The WordNet definition -> example task: test pairs held out by synset, validation pairs the last
    ``config.val_pairs`` of the rest."""
    train, test = definition_example_pairs(directory, config.eval_fraction)
    if len(train) <= config.val_pairs + 2:
        raise ValueError(f"only {len(train)} training pairs, fewer than val_pairs={config.val_pairs} + 2")
    cut = len(train) - config.val_pairs
    val = RetrievalPairs(train.queries[cut:], train.docs[cut:])
    train = RetrievalPairs(train.queries[:cut], train.docs[:cut])
    return RetrievalData(tokenizer, train, val, test, config)
