"""A sentence-retrieval task drives prunekit.prune_ on a text encoder: batches of (query, document) pairs scored
in-batch, recall@1 as the accuracy, and the registered channel methods (magnitude, Taylor, Kron-OBS) pruning heads
and FFN neurons of a BERT to a parameter target."""

from __future__ import annotations

import zlib

import pytest
import torch
import transformers

import prunekit
from prunekit.models.sentence import InBatchRetrieval, SentenceEncoder
from prunekit.retrieval import RetrievalConfig, RetrievalData, wordnet_retrieval
from prunekit.text import WORDNET_DIR, RetrievalPairs


class WordTokenizer:
    """The call signature of a Hugging Face tokenizer: words hashed into a small vocabulary, [CLS]=1, pad=0."""

    def __call__(self, texts, padding=True, truncation=True, max_length=16, return_tensors="pt"):
        rows = [[1] + [2 + zlib.crc32(w.encode()) % 60 for w in t.lower().split()][:max_length - 1] for t in texts]
        width = max(map(len, rows))
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}


def _pairs(start: int, n: int) -> RetrievalPairs:
    words = ["red", "blue", "cat", "dog", "sun", "rain", "tree", "stone", "river", "song", "bread", "salt"]
    queries = tuple(f"{words[i % 12]} {words[(3 * i) % 12]} thing {i}" for i in range(start, start + n))
    docs = tuple(f"the {words[i % 12]} {words[(3 * i) % 12]} example {i}" for i in range(start, start + n))
    return RetrievalPairs(queries, docs)


def _task() -> RetrievalData:
    return RetrievalData(WordTokenizer(), _pairs(0, 96), _pairs(100, 24), _pairs(200, 24),
                         RetrievalConfig(batch_size=16, max_length=12))


def _model() -> InBatchRetrieval:
    torch.manual_seed(0)
    bert = transformers.BertModel(transformers.BertConfig(vocab_size=64, hidden_size=24, num_hidden_layers=2,
                                                          num_attention_heads=6, intermediate_size=48))
    return InBatchRetrieval(SentenceEncoder(bert)).eval()


def test_the_task_offers_what_a_method_reads():
    task = _task()
    queries, docs = task.example_inputs()
    assert queries["input_ids"].shape[0] == docs["input_ids"].shape[0] == 2
    batches = list(task.scoring_batches(10, seed=0))
    assert len(batches) == 6  # 96 pairs in batches of 16, never more than there are
    (q, d), target = batches[0]
    assert q["input_ids"].shape[0] == 16 and torch.equal(target, torch.arange(16))
    assert [b[0][0]["input_ids"].tolist() for b in task.scoring_batches(2, 1)] == \
        [b[0][0]["input_ids"].tolist() for b in task.scoring_batches(2, 1)]
    recall = task.accuracy(_model(), "val")
    assert 0.0 <= recall <= 1.0 and task.metrics(_model(), "test")["mrr"] >= recall
    with pytest.raises(ValueError, match="the val split needs at least 2 pairs"):
        RetrievalData(WordTokenizer(), _pairs(0, 4), _pairs(0, 1), _pairs(0, 4))
    with pytest.raises(ValueError, match="batch_size must be an int >= 2"):
        RetrievalConfig(batch_size=1)


@pytest.mark.parametrize("method", ["l1", "taylor", "kron-obs"])
def test_registered_methods_prune_a_text_encoder_to_a_parameter_target(method):
    model, task = _model(), _task()
    dense = prunekit.count_params(model)
    extra = {"curvature": prunekit.FisherSettings(fisher_batches=2)} if method == "kron-obs" else {}
    config = prunekit.get_method(method).config(target="params=0.8", reconstruction_images=0, bn_images=0, **extra)
    record = prunekit.prune_(model, config, task, prunekit.RunContext(progress=False, log=lambda *_: None))
    assert prunekit.count_params(model) / dense == pytest.approx(0.8, abs=0.02)
    assert 0.0 <= record.val_acc_before_finetune <= 1.0
    roots = set(record.changes[0]["removed"])
    assert any(r.endswith("attention.self") or r.endswith("intermediate.dense") for r in roots)
    with torch.no_grad():
        assert model(*task.example_inputs(3)).shape == (3, 3)


def test_the_least_squares_refit_says_it_needs_images():
    config = prunekit.L1Config(target="params=0.8", bn_images=0)  # reconstruction on by default
    with pytest.raises(ValueError, match="set reconstruction_images=0"):
        prunekit.prune_(_model(), config, _task(), prunekit.RunContext(progress=False, log=lambda *_: None))


@pytest.mark.skipif(not WORDNET_DIR.is_dir(), reason=f"no WordNet in {WORDNET_DIR} (apt-get install wordnet-base)")
def test_the_wordnet_task_keeps_test_pairs_out_of_training_and_validation():
    task = wordnet_retrieval(WordTokenizer())
    assert len(task.val) == 1000 and len(task.test) > 5000
    assert not (set(task.test.docs) & (set(task.train.docs) | set(task.val.docs)))
    assert not set(task.val.docs) & set(task.train.docs)


def test_a_pruned_encoder_is_saved_alone_and_reloads_through_transformers(tmp_path):
    from prunekit.persistence.architecture import changes_within
    from prunekit.persistence.huggingface import load_pruned, save_pruned

    model, task = _model(), _task()
    record = prunekit.prune_(model, prunekit.L1Config(target="params=0.8", reconstruction_images=0, bn_images=0),
                             task, prunekit.RunContext(progress=False, log=lambda *_: None))
    bert = model.encoder.encoder
    queries, _ = task.example_inputs()
    folder = save_pruned(bert, tmp_path / "bert", changes_within(record.changes, "encoder.encoder"), queries)
    loaded = load_pruned(folder)
    with torch.no_grad():
        assert torch.equal(loaded(**queries).last_hidden_state, bert(**queries).last_hidden_state)
    with pytest.raises(ValueError, match="outside 'encoder.other'"):
        changes_within(record.changes, "encoder.other")


def test_distillation_brings_an_encoder_back_towards_the_dense_one():
    import copy

    from prunekit.recovery.distill import distill_embeddings_, embedding_fidelity

    task = _task()
    dense = _model().encoder
    student = copy.deepcopy(dense)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a damaged copy, as pruning leaves it
        for p in student.parameters():
            if p.dim() == 2:
                p.add_(0.3 * p.std() * torch.randn(p.shape, generator=gen))
    train_texts = list(task.train.queries + task.train.docs)
    held_out = list(task.test.queries + task.test.docs)
    before = embedding_fidelity(student, dense, task.tokenizer, held_out)
    teacher_state = {k: v.clone() for k, v in dense.state_dict().items()}
    losses = distill_embeddings_(student, dense, task.tokenizer, train_texts, steps=40, batch_size=16, lr=1e-3)
    after = embedding_fidelity(student, dense, task.tokenizer, held_out)
    assert len(losses) == 40 and sum(losses[-5:]) < sum(losses[:5])
    assert before < after
    assert all(torch.equal(v, teacher_state[k]) for k, v in dense.state_dict().items())  # the teacher is untouched
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        distill_embeddings_(student, dense, task.tokenizer, train_texts, steps=0)


def test_eigendamage_prunes_a_text_encoder_in_its_eigenbasis():
    model, task = _model(), _task()
    dense = prunekit.count_params(model)
    config = prunekit.EigenDamageConfig(target="params=0.9", bn_images=0,
                                        curvature=prunekit.FisherSettings(fisher_batches=2))
    prunekit.prune_(model, config, task, prunekit.RunContext(progress=False, log=lambda *_: None))
    assert prunekit.count_params(model) / dense == pytest.approx(0.9, abs=0.02)
    assert any(type(m).__name__ == "KFEBottleneck" for m in model.modules())
    with torch.no_grad():
        assert model(*task.example_inputs(3)).shape == (3, 3)
