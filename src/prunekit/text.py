"""Real English text offline, and the retrieval task a sentence encoder is measured on.

* WordNet 3.0 (Miller 1995; Debian ``wordnet-base``, ``/usr/share/wordnet``): every synset's gloss holds a
  definition and, for many synsets, example sentences in quotes (``cause to be calm; "The patient must be
  sedated"``). :func:`definition_example_pairs` turns them into a retrieval task: the query is a definition, its
  answer is the synset's first example sentence, among every other pair's example.
* fortunes (Debian ``fortunes``, ``/usr/share/games/fortunes``): short texts separated by ``%`` lines, unlabeled
  English for distillation.

Nothing is downloaded: a missing package is an error that names the ``apt-get install`` that provides it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

WORDNET_DIR = Path("/usr/share/wordnet")
FORTUNES_DIR = Path("/usr/share/games/fortunes")
WORDNET_PARTS = ("noun", "verb", "adj", "adv")
_QUOTED = re.compile(r'"([^"]+)"')


@dataclass(frozen=True)
class Synset:
    """One WordNet synset: its offset and part of speech, lemmas, definition and example sentences."""

    offset: str
    pos: str
    lemmas: tuple[str, ...]
    definition: str
    examples: tuple[str, ...]


def _require_dir(directory: Path, package: str) -> Path:
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} not found: install the Debian package with `apt-get install {package}` "
                                "(or pass the folder that holds its files)")
    return directory


def parse_synset_line(line: str) -> Synset | None:
    """A ``data.<pos>`` line as a :class:`Synset` (``None`` for the licence header, whose lines start with spaces).

    Raises:
        ValueError: a line that is not in the WordNet data-file format.
    """
    if not line.strip() or line.startswith(" "):
        return None
    head, bar, gloss = line.partition(" | ")
    fields = head.split()
    if not bar or len(fields) < 6:
        raise ValueError(f"not a WordNet data line: {line[:80]!r}")
    count = int(fields[3], 16)
    lemmas = tuple(fields[4 + 2 * i].replace("_", " ") for i in range(count))
    examples = tuple(e.strip() for e in _QUOTED.findall(gloss) if e.strip())
    definition = gloss.split('"', 1)[0].strip().rstrip(";").strip()
    return Synset(fields[0], fields[2], lemmas, definition, examples)


def read_wordnet(directory: str | Path = WORDNET_DIR, parts: tuple[str, ...] = WORDNET_PARTS) -> Iterator[Synset]:
    """Every synset of the ``data.<part>`` files in ``directory``, in file order."""
    directory = _require_dir(Path(directory), "wordnet-base")
    for part in parts:
        path = directory / f"data.{part}"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: {directory} is not a WordNet 3.0 dictionary folder")
        with path.open(encoding="utf-8", errors="replace") as handle:
            for line in handle:
                synset = parse_synset_line(line)
                if synset is not None:
                    yield synset


@dataclass(frozen=True)
class RetrievalPairs:
    """Queries and the document that answers each (``docs[i]`` answers ``queries[i]``)."""

    queries: tuple[str, ...]
    docs: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.queries)


def _bucket(key: str) -> float:
    """A stable number in [0, 1) from a text key (the split does not depend on file order or Python's hash)."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:12], 16) / 16 ** 12


def definition_example_pairs(directory: str | Path = WORDNET_DIR, eval_fraction: float = 0.25,
                             min_words: int = 4) -> tuple[RetrievalPairs, RetrievalPairs]:
    """(train, eval) pairs of WordNet definition -> the synset's first example sentence.

    Synsets go to eval with probability ``eval_fraction`` by a hash of their offset and part of speech (stable
    across machines). Examples shorter than ``min_words`` words, and examples or definitions seen before (they
    would have two right answers), are left out.
    """
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction!r}")
    seen: set[str] = set()
    split: dict[bool, tuple[list[str], list[str]]] = {True: ([], []), False: ([], [])}
    for s in read_wordnet(directory):
        if not s.examples or not s.definition:
            continue
        example = s.examples[0]
        if len(example.split()) < min_words or example.lower() in seen or s.definition.lower() in seen:
            continue
        seen.update((example.lower(), s.definition.lower()))
        queries, docs = split[_bucket(f"{s.pos}{s.offset}") < eval_fraction]
        queries.append(s.definition)
        docs.append(example)
    return (RetrievalPairs(tuple(split[False][0]), tuple(split[False][1])),
            RetrievalPairs(tuple(split[True][0]), tuple(split[True][1])))


def read_fortunes(directory: str | Path = FORTUNES_DIR, max_words: int = 60) -> list[str]:
    """Every fortune (``%``-separated) of the plain-text files in ``directory`` with at most ``max_words`` words,
    whitespace collapsed, in file-name order."""
    directory = _require_dir(Path(directory), "fortunes")
    texts = []
    for path in sorted(p for p in directory.iterdir() if p.is_file() and not p.suffix):
        body = path.read_text(encoding="utf-8", errors="replace")
        for chunk in re.split(r"^%[ \t]*$", body, flags=re.M):  # a line holding only % separates fortunes
            text = " ".join(chunk.split())
            if text and len(text.split()) <= max_words:
                texts.append(text)
    if not texts:
        raise FileNotFoundError(f"{directory} holds no fortune files")
    return texts


def retrieval_metrics(queries: torch.Tensor, docs: torch.Tensor) -> dict[str, float]:
    """Recall@1 and mean reciprocal rank when ``docs[i]`` answers ``queries[i]``, by cosine similarity over all
    docs (ties count against the answer).

    Args:
        queries, docs: Embeddings, ``(n, d)`` each.
    """
    if queries.shape != docs.shape or queries.dim() != 2:
        raise ValueError(f"queries and docs must be (n, d) embeddings of the same shape, got {tuple(queries.shape)} "
                         f"and {tuple(docs.shape)}")
    q = torch.nn.functional.normalize(queries.double(), dim=1)
    d = torch.nn.functional.normalize(docs.double(), dim=1)
    sims = q @ d.T
    right = sims.diagonal()
    rank = (sims >= right[:, None]).sum(1)  # 1 = the answer is first
    return {"recall@1": float((rank == 1).double().mean()), "mrr": float((1.0 / rank.double()).mean())}
