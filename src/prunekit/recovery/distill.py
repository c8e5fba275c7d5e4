"""Recovering a pruned sentence encoder by distilling the dense encoder's embeddings on unlabeled text.

The pruned student is trained so that its unit-length sentence embeddings point where the dense teacher's do:
``L = mean_i (1 - cos(s(x_i), t(x_i)))`` over batches of text (no labels; the embedding-distillation recipe of
Reimers & Gurevych 2020, arXiv 2004.09813, with a cosine instead of a squared error since both embeddings are
normalised). :func:`embedding_fidelity` measures the same cosine on held-out text.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit.channels.model_io import to_device
from prunekit.configs import Config
from prunekit.models.sentence import embed, tokenize


@dataclass(frozen=True)
class DistillConfig(Config):
    """Recovery of a pruned sentence encoder by embedding distillation (:func:`distill_embeddings_`).

    Args:
        steps: AdamW steps towards the dense encoder's embeddings (0: no distillation).
        lr: AdamW learning rate.
        batch_size: Texts per step.
    """

    steps: int = 300
    lr: float = 5e-5
    batch_size: int = 32

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"distillation steps (--distill-steps) must be an int >= 0, got {self.steps!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 2:
            raise ValueError(f"distillation batch_size must be an int >= 2, got {self.batch_size!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not 0 < self.lr < 1:
            raise ValueError(f"distillation lr (--distill-lr) must be in (0, 1), got {self.lr!r}")


@torch.no_grad()
def embedding_fidelity(student: nn.Module, teacher: nn.Module, tokenizer, texts: Sequence[str],
                       max_length: int = 128) -> float:
    """Mean cosine between the student's and the teacher's embeddings of ``texts`` (1.0: the same)."""
    a = embed(student, tokenizer, texts, max_length=max_length)
    b = embed(teacher, tokenizer, texts, max_length=max_length)
    return float(nn.functional.cosine_similarity(a, b, dim=1).mean())


def distill_embeddings_(student: nn.Module, teacher: nn.Module, tokenizer, texts: Sequence[str], steps: int,
                        batch_size: int = 32, lr: float = 5e-5, max_length: int = 128, seed: int = 0,
                        progress: bool = False) -> list[float]:
    """Train ``student`` in place for ``steps`` AdamW steps towards ``teacher``'s embeddings of ``texts``
    (shuffled, cycled); the teacher is left untouched. Returns the loss of every step.

    Raises:
        ValueError: no texts, or steps / batch_size / lr out of range.
    """
    if not texts:
        raise ValueError("distillation needs some text")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 2:
        raise ValueError(f"batch_size must be an int >= 2, got {batch_size!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    device = next(student.parameters()).device
    rng = random.Random(seed)
    order: list[int] = []
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=lr)
    was_training = student.training
    teacher.eval()
    student.train()
    losses = []
    try:
        for _ in tqdm(range(steps), desc="distilling", disable=not progress, leave=False):
            if len(order) < batch_size:
                fresh = list(range(len(texts)))
                rng.shuffle(fresh)
                order += fresh
            batch, order = order[:batch_size], order[batch_size:]
            inputs = to_device(tokenize(tokenizer, [texts[i] for i in batch], max_length), device)
            with torch.no_grad():
                target = teacher(**inputs)
            loss = (1 - nn.functional.cosine_similarity(student(**inputs), target, dim=1)).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    finally:
        student.train(was_training)
    return losses
