"""Hugging Face models in and out: BERT- and ViT-style transformers (tiny random configs, nothing downloaded) lose
heads and FFN neurons exactly, are saved as config + safetensors + prunekit's record, and rebuild through
``transformers`` in a new process with identical outputs; a folder asking for remote code is refused."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from architectures import random_plan
from prunekit.channels.graph import ChannelGraph, ChannelPlan
from prunekit.persistence.checkpoint import CheckpointError
from prunekit.persistence.export import check_onnx_keywords, export_onnx_keywords
from prunekit.persistence.huggingface import load_pretrained, load_pruned, save_pruned

ROOT = Path(__file__).resolve().parents[1]


def tiny_bert() -> transformers.BertModel:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=24, num_hidden_layers=2, num_attention_heads=6,
                                     intermediate_size=48, max_position_embeddings=32)
    return transformers.BertModel(config).eval()


def tiny_vit() -> transformers.ViTForImageClassification:
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=32, num_labels=3)
    return transformers.ViTForImageClassification(config).eval()


def bert_inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    return {"input_ids": torch.randint(0, 64, (3, 9), generator=gen), "attention_mask": mask}


def _prune(model, inputs, seed: int = 2):
    graph = ChannelGraph(model, inputs)
    plan = random_plan(graph, seed=seed, fraction=0.5)
    graph.shrink_(plan)  # checks every output of the model against masking, 1e-5
    return plan


def test_bert_loses_heads_and_ffn_neurons_and_reloads_in_a_new_process(tmp_path):
    model = tiny_bert()
    inputs = bert_inputs()
    graph = ChannelGraph(model, inputs)
    roots = set(graph.by_root)
    assert {"encoder.layer.0.attention.self", "encoder.layer.0.intermediate.dense"} <= roots
    plan = random_plan(graph, seed=2, fraction=0.5)
    graph.shrink_(plan)
    assert model.encoder.layer[0].attention.self.num_attention_heads == 3
    assert model.encoder.layer[0].intermediate.dense.out_features == 24
    with torch.no_grad():
        expected = model(**inputs).last_hidden_state
    folder = save_pruned(model, tmp_path / "pruned", [plan.to_dict()], inputs)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "prunekit.json"]
    torch.save(dict(inputs), tmp_path / "inputs.pt")
    script = textwrap.dedent(f"""
        import torch
        from safetensors.torch import save_file
        from prunekit.persistence.huggingface import load_pruned
        model = load_pruned({str(folder)!r})
        inputs = torch.load({str(tmp_path / 'inputs.pt')!r}, weights_only=True)
        assert type(model).__name__ == "BertModel", type(model)
        with torch.no_grad():
            save_file({{"out": model(**inputs).last_hidden_state.contiguous()}}, {str(tmp_path / 'out.safetensors')!r})
        """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert torch.equal(load_file(tmp_path / "out.safetensors")["out"], expected)


def test_vit_classifier_round_trips_with_identical_outputs(tmp_path):
    model = tiny_vit()
    inputs = {"pixel_values": torch.randn(2, 1, 8, 8)}
    plan = _prune(model, inputs)
    assert any(".attention" in root for root in plan.removed)
    with torch.no_grad():
        expected = model(**inputs).logits
    loaded = load_pruned(save_pruned(model, tmp_path / "vit", [plan.to_dict()], inputs))
    assert isinstance(loaded, transformers.ViTForImageClassification)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, expected)
        assert loaded(pixel_values=torch.randn(5, 1, 8, 8)).logits.shape == (5, 3)


def test_a_local_pretrained_folder_loads_without_the_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = tiny_bert()
    model.save_pretrained(tmp_path / "bert")
    loaded = load_pretrained(tmp_path / "bert")
    inputs = bert_inputs()
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).last_hidden_state, model(**inputs).last_hidden_state)
    with pytest.raises(FileNotFoundError, match="no Hugging Face model folder"):
        load_pretrained(tmp_path / "missing")


def test_a_folder_asking_for_remote_code_is_refused(tmp_path):
    tiny_bert().save_pretrained(tmp_path / "bert")
    config = json.loads((tmp_path / "bert" / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "evil.module:Model"}
    (tmp_path / "bert" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="asks for remote code"):
        load_pretrained(tmp_path / "bert")


def test_a_record_naming_a_class_outside_transformers_is_refused(tmp_path):
    model = tiny_bert()
    folder = save_pruned(model, tmp_path / "p", [], bert_inputs())
    record = json.loads((folder / "prunekit.json").read_text())
    (folder / "prunekit.json").write_text(json.dumps({**record, "class": "os.system"}))
    with pytest.raises(CheckpointError, match="'os.system' is not a model class of transformers"):
        load_pruned(folder)


def test_weights_that_do_not_fit_the_record_are_refused(tmp_path):
    model = tiny_bert()
    inputs = bert_inputs()
    folder = save_pruned(model, tmp_path / "p", [], inputs)  # the dense weights
    plan = _prune(tiny_bert(), inputs)
    record = json.loads((folder / "prunekit.json").read_text())
    (folder / "prunekit.json").write_text(json.dumps({**record, "architecture_changes": [plan.to_dict()]}))
    with pytest.raises(CheckpointError, match="does not fit the rebuilt BertModel"):
        load_pruned(folder)


def test_saving_never_writes_into_a_folder_with_files(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        save_pruned(tiny_bert(), tmp_path / "mine", [], bert_inputs())
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(TypeError, match="takes a transformers model"):
        save_pruned(torch.nn.Linear(2, 2), tmp_path / "other", [], bert_inputs())
    with pytest.raises(TypeError, match="dict of keyword tensors"):
        save_pruned(tiny_bert(), tmp_path / "other", [], torch.zeros(2, 3))
    with pytest.raises(FileNotFoundError, match="not a pruned model saved by prunekit"):
        load_pruned(tmp_path / "mine")


@pytest.mark.slow
def test_pruned_models_export_to_onnx_checked_by_onnx_runtime(tmp_path):
    bert = tiny_bert()
    _prune(bert, bert_inputs())
    path = export_onnx_keywords(bert, tmp_path / "bert.onnx", bert_inputs())
    longer = {"input_ids": torch.randint(0, 64, (5, 13)), "attention_mask": torch.ones(5, 13, dtype=torch.long)}
    assert check_onnx_keywords(bert, path, longer) < 1e-4  # another batch and sequence length
    vit = tiny_vit()
    pixels = {"pixel_values": torch.randn(2, 1, 8, 8)}
    _prune(vit, pixels)
    path = export_onnx_keywords(vit, tmp_path / "vit.onnx", pixels)
    assert check_onnx_keywords(vit, path, {"pixel_values": torch.randn(7, 1, 8, 8)}) < 1e-4


def test_a_bert_reaches_a_parameter_target_through_the_engine_with_keyword_inputs():
    from prunekit.channels.criteria import CRITERIA, score_groups
    from prunekit.measurement.metrics import count_flops, count_params
    from prunekit.planning.allocation import CostModel, Target, plan_for_target

    model = tiny_bert()
    inputs = bert_inputs()
    dense_params, dense_flops = count_params(model), count_flops(model, inputs)
    graph = ChannelGraph(model, inputs)
    cost = CostModel(model, graph)  # FLOPs counted on the keyword inputs
    assert cost.dense_flops == dense_flops
    plan, kept = plan_for_target(score_groups(CRITERIA.get("l1")(), graph), cost, Target.parse("params=0.85"))
    graph.shrink_(plan)
    assert count_params(model) / dense_params == pytest.approx(kept, abs=1e-9)
    assert kept == pytest.approx(0.85, abs=0.02)  # embeddings and the residual stream stay whole
    assert count_flops(model, inputs) < dense_flops


def _retrieval_batches(n_batches: int = 2, size: int = 4):
    gen = torch.Generator().manual_seed(5)
    out = []
    for _ in range(n_batches):
        q = {"input_ids": torch.randint(0, 64, (size, 6), generator=gen), "attention_mask": torch.ones(size, 6,
                                                                                                        dtype=torch.long)}
        d = {"input_ids": torch.randint(0, 64, (size, 8), generator=gen), "attention_mask": torch.ones(size, 8,
                                                                                                        dtype=torch.long)}
        out.append(((q, d), torch.arange(size)))
    return out


def test_taylor_and_curvature_read_a_retrieval_model_with_keyword_inputs():
    from prunekit.channels.criteria import CRITERIA, score_groups
    from prunekit.curvature.kfac import CurvatureConfig, collect_kfac
    from prunekit.models.sentence import InBatchRetrieval, SentenceEncoder

    model = InBatchRetrieval(SentenceEncoder(tiny_bert())).eval()
    batches = _retrieval_batches()
    graph = ChannelGraph(model, batches[0][0])
    taylor = CRITERIA.get("taylor")()
    taylor.prepare(model, graph, batches)
    scores = score_groups(taylor, graph)
    heads = "encoder.encoder.encoder.layer.0.attention.self"
    assert heads in scores and scores[heads].shape == (24,) and torch.isfinite(scores[heads]).all()
    assert scores[heads].sum() > 0
    factors = collect_kfac(model, batches, CurvatureConfig(batches=2), layers=[f"{heads}.query"])
    assert factors[f"{heads}.query"].A.shape == (25, 25) and factors[f"{heads}.query"].G.shape == (24, 24)


def test_a_bfloat16_model_reloads_in_bfloat16_with_identical_outputs(tmp_path):
    model = tiny_bert().to(torch.bfloat16)
    inputs = bert_inputs()
    plan = _prune(model, inputs)
    loaded = load_pruned(save_pruned(model, tmp_path / "bf16", [plan.to_dict()], inputs))
    assert next(loaded.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).last_hidden_state, model(**inputs).last_hidden_state)


@pytest.mark.parametrize("edit, message", [
    (lambda r: r.pop("inputs"), "inputs must map each input name"),
    (lambda r: r.update(inputs=[1, 2]), "inputs must map each input name"),
    (lambda r: r["inputs"]["input_ids"].pop("shape"), "inputs must map each input name"),
    (lambda r: r.update(dtype="int8"), "is not a floating-point dtype"),
    (lambda r: r["architecture_changes"][0].update(attention=[{"module": "x"}]), "does not fit BertModel"),
])
def test_malformed_records_are_checkpoint_errors(tmp_path, edit, message):
    model, inputs = tiny_bert(), bert_inputs()
    graph = ChannelGraph(model, inputs)
    plan = random_plan(graph, seed=2, fraction=0.5)
    graph.shrink_(plan)
    folder = save_pruned(model, tmp_path / "p", [graph.change(plan)], inputs)
    record = json.loads((folder / "prunekit.json").read_text())
    edit(record)
    (folder / "prunekit.json").write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match=message):
        load_pruned(folder)


def test_a_hand_described_attention_block_is_recorded_and_replayed(tmp_path):
    from prunekit.channels.heads import AttentionSpec, find_attention

    model, inputs = tiny_bert(), bert_inputs()
    auto = find_attention(model)[0]
    spec = AttentionSpec(auto.module, auto.q, auto.k, auto.v, auto.out, auto.num_heads, auto.head_dim,
                         head_count_attrs=("num_attention_heads",))
    graph = ChannelGraph(model, inputs, attention=[spec])
    plan = ChannelPlan({spec.module: graph.by_root[spec.module].units[0]})
    graph.shrink_(plan)
    change = graph.change(plan, ignore=["pooler.dense"])
    assert change["attention"] == [spec.to_dict()] and change["ignore"] == ["pooler.dense"]
    loaded = load_pruned(save_pruned(model, tmp_path / "p", [change], inputs))
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).last_hidden_state, model(**inputs).last_hidden_state)


def test_export_keeps_each_input_length_dynamic_on_its_own(tmp_path):
    class TwoLengths(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(20, 8)
            self.head = torch.nn.Linear(8, 2)

        def forward(self, input_ids, decoder_input_ids):
            return self.head(self.embed(input_ids).mean(1) + self.embed(decoder_input_ids).mean(1))

    model = TwoLengths().eval()
    example = {"input_ids": torch.randint(0, 20, (2, 7)), "decoder_input_ids": torch.randint(0, 20, (2, 3))}
    path = export_onnx_keywords(model, tmp_path / "two.onnx", example)
    other = {"input_ids": torch.randint(0, 20, (3, 11)), "decoder_input_ids": torch.randint(0, 20, (3, 5))}
    assert check_onnx_keywords(model, path, other) < 1e-5
    with pytest.raises(ValueError, match="at least 2 tokens"):
        export_onnx_keywords(model, tmp_path / "one.onnx", {"input_ids": torch.zeros(2, 1, dtype=torch.long),
                                                             "decoder_input_ids": torch.zeros(2, 3, dtype=torch.long)})
