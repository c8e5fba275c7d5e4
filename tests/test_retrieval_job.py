"""The pruning job on a Hugging Face sentence encoder: ``prunekit prune METHOD --model hf:FOLDER --data
wordnet-retrieval`` measures recall@1, distils, saves a transformers folder that reloads with identical outputs,
resumes, exports ONNX, and refuses what does not fit a text encoder with one line."""

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
def encoder_folder(tmp_path_factory):
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
def test_the_cli_prunes_distils_saves_and_exports_a_hugging_face_encoder(encoder_folder, tmp_path, capsys):
    out = tmp_path / "job"
    assert main(_args(encoder_folder, out)) == 0
    report = json.loads((out / "report.json").read_text())
    run = report["runs"]["flops-0.6"]
    assert run["compressed"]["flops"] / report["dense"]["flops"] == pytest.approx(0.6, abs=0.02)
    assert 0 <= run["compressed"]["test_acc"] <= run["compressed"]["test_mrr"] <= 1  # recall@1 <= MRR
    assert run["compressed"]["distill_steps"] == 4 and -1 <= run["compressed"]["fidelity"] <= 1
    assert any("recall@1" in note for note in run["notes"])
    assert report["recipe"]["job"]["source"]["model"] == f"hf:{encoder_folder.resolve()}"
    folder = out / "flops-0.6" / "encoder"
    loaded = load_pruned(folder)
    assert type(loaded) is transformers.BertModel
    assert transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True).vocab_size == 57
    ids = torch.randint(5, 57, (2, 9), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    pruned = prunekit.load_pruned(folder)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).last_hidden_state, pruned(**inputs).last_hidden_state)
    assert sum(p.numel() for p in loaded.parameters()) == run["compressed"]["params"]

    capsys.readouterr()
    assert main(["export", str(out), "--onnx", str(tmp_path / "encoder.onnx")]) == 0
    assert "ONNX Runtime matches PyTorch" in capsys.readouterr().out

    assert main(_args(encoder_folder, out, "taylor", "--resume")) == 0  # the saved round is replayed, not re-scored
    assert "resuming after round 1" in capsys.readouterr().out
    again = json.loads((out / "report.json").read_text())["runs"]["flops-0.6"]["compressed"]
    assert again["params"] == run["compressed"]["params"]
    assert again["fidelity_before_distill"] == pytest.approx(run["compressed"]["fidelity_before_distill"])

    assert main(["bench", str(out)]) == 2
    assert "is a pruned Hugging Face encoder" in one_error_line(capsys, "bench")


@needs_wordnet
def test_eigendamage_runs_from_the_cli_and_its_bottlenecks_reload(encoder_folder, tmp_path):
    out = tmp_path / "job"
    assert main(_args(encoder_folder, out, "eigendamage", "--fisher-batches", "2", target="params=0.7")) == 0
    model = load_pruned(out / "params-0.7" / "encoder")
    assert any(type(m).__name__ == "KFEBottleneck" for m in model.modules())


@pytest.mark.parametrize("args, message", [
    (["--model", "lenet5", "--data", "digits", "--distill-steps", "5"], "recovers a Hugging Face sentence encoder"),
    (["--model", "hf:/no/such/folder"], "no folder /no/such/folder"),
    (["--model", "hf:"], "hf: needs a folder"),
    (["--model", "lenet5", "--data", "wordnet-retrieval"], "wordnet-retrieval is a text task"),
])
def test_misuse_is_one_line(args, message, tmp_path, capsys):
    assert main(["prune", "l1", *args, "--target", "flops=0.5", "--out", str(tmp_path / "o"), "--no-latency"]) == 2
    assert message in one_error_line(capsys, "prune")


def test_an_hf_folder_refuses_an_image_dataset_and_a_checkpoint(encoder_folder, tmp_path, capsys):
    base = ["prune", "l1", "--model", f"hf:{encoder_folder}", "--target", "flops=0.5", "--out", str(tmp_path / "o")]
    assert main([*base, "--data", "digits", "--reconstruction-images", "0"]) == 2
    assert "pruned on a text task: --data wordnet-retrieval" in one_error_line(capsys, "prune")
    assert main([*base, "--reconstruction-images", "0", "--checkpoint", str(encoder_folder / "model.safetensors")]) == 2
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
