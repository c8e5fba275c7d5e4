"""The pruning job on Hugging Face models: ``prunekit prune METHOD --model hf:FOLDER --data wordnet-retrieval`` on
a sentence encoder measures recall@1, distils, saves a transformers folder that reloads with identical outputs,
resumes and exports ONNX; a ViT image classifier runs the image job; what does not fit is refused with one line."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import prunekit
from cli_lines import one_error_line
from prunekit.cli import main
from prunekit.persistence.huggingface import load_pruned
from prunekit.text import WORDNET_DIR

needs_wordnet = pytest.mark.skipif(not WORDNET_DIR.is_dir(),
                                   reason=f"no WordNet in {WORDNET_DIR} (apt-get install wordnet-base)")
LETTERS = "abcdefghijklmnopqrstuvwxyz"


@pytest.fixture(scope="module")
def text_encoder(tmp_path_factory):
    """A tiny random BERT with a WordPiece tokenizer of single letters (every English word tokenizes)."""
    folder = tmp_path_factory.mktemp("tiny-encoder")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *LETTERS, *(f"##{c}" for c in LETTERS)]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=80,
                                     architectures=["BertModel"])
    transformers.BertModel(config).save_pretrained(folder)
    return folder


def _args(folder, out, method="taylor", *extra, target="flops=0.6"):
    refit = ["--reconstruction-images", "0"] if method != "eigendamage" else []
    return ["prune", method, "--model", f"hf:{folder}", "--data", "wordnet-retrieval", "--limit", "300",
            "--target", target, *refit, "--bn-images", "0", "--distill-steps", "4", "--no-latency",
            "--no-progress", "--out", str(out), *extra]


@needs_wordnet
def test_the_cli_prunes_distils_saves_and_exports_a_hugging_face_encoder(text_encoder, tmp_path, capsys):
    out = tmp_path / "job"
    assert main(_args(text_encoder, out)) == 0
    report = json.loads((out / "report.json").read_text())
    run = report["runs"]["flops-0.6"]
    assert run["compressed"]["flops"] / report["dense"]["flops"] == pytest.approx(0.6, abs=0.02)
    assert 0 <= run["compressed"]["test_acc"] <= run["compressed"]["test_mrr"] <= 1  # recall@1 <= MRR
    assert len(run["compressed"]["distill_loss"]) == 2  # first and last step's loss: it did distil
    assert any("recall@1" in note for note in run["notes"])
    assert report["recipe"]["job"]["source"]["model"] == f"hf:{text_encoder.resolve()}"
    assert report["recipe"]["job"]["distill"]["steps"] == 4 and run["model"] == "flops-0.6/hf"
    folder = out / "flops-0.6" / "hf"
    loaded = load_pruned(folder)
    assert type(loaded) is transformers.BertModel
    assert transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True).vocab_size == 57
    assert sum(p.numel() for p in loaded.parameters()) == run["compressed"]["params"]

    capsys.readouterr()
    assert main(["export", str(out), "--onnx", str(tmp_path / "encoder.onnx")]) == 0
    assert "ONNX Runtime matches PyTorch" in capsys.readouterr().out

    assert main(_args(text_encoder, out, "taylor", "--resume")) == 0  # the saved round is replayed, not re-scored
    assert "resuming after round 1" in capsys.readouterr().out
    again = json.loads((out / "report.json").read_text())["runs"]["flops-0.6"]["compressed"]
    assert again["params"] == run["compressed"]["params"]
    assert again["fidelity_before_distill"] == pytest.approx(run["compressed"]["fidelity_before_distill"])

    assert main(["bench", str(out)]) == 2
    assert "is a pruned Hugging Face model" in one_error_line(capsys, "bench")


@needs_wordnet
def test_the_saved_folder_is_the_measured_model_and_latency_is_measured(text_encoder, tmp_path):
    config = prunekit.L1Config(target="flops=0.6", reconstruction_images=0, bn_images=0)
    result = prunekit.prune_job(config, model=f"hf:{text_encoder}", out=tmp_path / "job", progress=False,
                                data=prunekit.DataConfig("wordnet-retrieval", limit=200, val_fraction=0.2),
                                distill=prunekit.DistillConfig(steps=2), log=lambda *_: None)
    run = result.runs["flops-0.6"]
    assert run.compressed["latency_ms_b64"] > 0 and result.dense["latency_ms_b1"] > 0
    loaded = load_pruned(run.checkpoint)
    ids = torch.randint(5, 57, (3, 11), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).last_hidden_state,
                           run.model.encoder.encoder(**inputs).last_hidden_state)
    assert any("160 train / 40 val" in note for note in run.record.notes)  # --limit and --val-fraction applied


@needs_wordnet
def test_eigendamage_runs_from_the_cli_and_its_bottlenecks_reload(text_encoder, tmp_path):
    out = tmp_path / "job"
    assert main(_args(text_encoder, out, "eigendamage", "--fisher-batches", "2", target="params=0.7")) == 0
    model = load_pruned(out / "params-0.7" / "hf")
    assert any(type(m).__name__ == "KFEBottleneck" for m in model.modules())


def test_text_jobs_refuse_image_training_and_unusable_folders(text_encoder, tmp_path, capsys):
    base = ["prune", "l1", "--model", f"hf:{text_encoder}", "--target", "flops=0.5", "--reconstruction-images", "0",
            "--out", str(tmp_path / "o")]
    assert main([*base, "--finetune-epochs", "1"]) == 2
    assert "trains on labelled images (finetune_epochs > 0)" in one_error_line(capsys, "prune")
    assert main([*base, "--lr", "0.1"]) == 2
    assert "--lr set the method's image training" in one_error_line(capsys, "prune")
    assert main(["prune", "admm", "--model", f"hf:{text_encoder}", "--out", str(tmp_path / "o")]) == 2
    assert "admm trains on labelled images" in one_error_line(capsys, "prune")
    bare = tmp_path / "no-tokenizer"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((text_encoder / name).read_bytes())
    assert main([*base[:3], f"hf:{bare}", *base[4:]]) == 2
    assert "has no tokenizer files" in one_error_line(capsys, "prune")
    pruned = tmp_path / "pruned"
    pruned.mkdir()
    (pruned / "prunekit.json").write_text("{}")
    assert main([*base[:3], f"hf:{pruned}", *base[4:]]) == 2
    assert "holds a model pruned by prunekit" in one_error_line(capsys, "prune")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, message", [
    (["--model", "lenet5", "--data", "digits", "--distill-steps", "5"], "recovers a Hugging Face sentence encoder"),
    (["--model", "hf:/no/such/folder"], "no folder /no/such/folder"),
    (["--model", "hf:"], "hf: needs a folder"),
    (["--model", "lenet5", "--data", "wordnet-retrieval"], "wordnet-retrieval is a text task"),
])
def test_misuse_is_one_line(args, message, tmp_path, capsys):
    assert main(["prune", "l1", *args, "--target", "flops=0.5", "--out", str(tmp_path / "o"), "--no-latency"]) == 2
    assert message in one_error_line(capsys, "prune")


def test_an_hf_folder_refuses_an_image_dataset_and_a_checkpoint(text_encoder, tmp_path, capsys):
    base = ["prune", "l1", "--model", f"hf:{text_encoder}", "--target", "flops=0.5", "--out", str(tmp_path / "o")]
    assert main([*base, "--data", "digits", "--reconstruction-images", "0"]) == 2
    assert "(BertModel) does not fit digits: its config has num_channels None" in one_error_line(capsys, "prune")
    assert main([*base, "--reconstruction-images", "0", "--checkpoint", str(text_encoder / "model.safetensors")]) == 2
    assert "a Hugging Face folder holds its own weights" in one_error_line(capsys, "prune")
    assert main([*base]) == 2  # the channel methods' least-squares re-fit is on by default
    assert "pass --reconstruction-images 0" in one_error_line(capsys, "prune")
    assert not (tmp_path / "o" / "recipe.yaml").exists()


def test_training_refuses_a_text_task_and_names_distillation():
    from test_retrieval import _model, _task

    with pytest.raises(ValueError, match="recovers by embedding distillation"):
        prunekit.fit(_model(), _task(), prunekit.TrainConfig(epochs=1), progress=False)
    with pytest.raises(ValueError, match="--distill-steps"):
        prunekit.JobConfig(prunekit.ModelSource(model="x"), distill={"steps": -1})


def test_a_vit_image_classifier_runs_the_image_job_and_reloads_as_its_class(tmp_path, capsys):
    folder = tmp_path / "vit"
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=1, num_labels=10, hidden_size=32,
                                    num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                    architectures=["ViTForImageClassification"])
    transformers.ViTForImageClassification(config).save_pretrained(folder)
    out = tmp_path / "job"
    args = ["prune", "taylor", "--model", f"hf:{folder}", "--data", "digits", "--target", "flops=0.6",
            "--finetune-epochs", "1", "--no-latency", "--no-progress", "--out", str(out)]
    assert main(args) == 0
    result = json.loads((out / "report.json").read_text())["runs"]["flops-0.6"]["compressed"]
    model = load_pruned(out / "flops-0.6" / "hf")
    assert type(model) is transformers.ViTForImageClassification
    assert sum(p.numel() for p in model.parameters()) == result["params"]
    data = prunekit.load_dataset("digits")
    with torch.no_grad():
        acc = (model(pixel_values=data.test.tensors[0]).logits.argmax(1) == data.test.tensors[1]).float().mean()
    assert float(acc) == pytest.approx(result["test_acc"], abs=1e-6)
    capsys.readouterr()
    assert main(["prune", "l1", "--model", f"hf:{folder}", "--data", "synthetic", "--out", str(tmp_path / "o")]) == 2
    assert "image_size 8 (the data needs 12), num_labels 10 (the data needs 4)" in one_error_line(capsys, "prune")
