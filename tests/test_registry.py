"""Every registered method runs through the one job runner: the same output layout and report schema, a written
recipe that re-runs it, a checkpoint that loads to the same outputs, and a resume after a kill at any write that
ends with exactly the tensors of an uninterrupted run.

``QUICK`` holds a small config per method; a method registered without one fails
:func:`test_every_method_has_a_quick_config`, so a new method cannot skip these checks.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import prunekit
from kills import KILLED, counting_replaces, run_killed
from prunekit.data import DataConfig
from prunekit.jobs import train_job
from prunekit.persistence.architecture import load_compressed
from prunekit.training import TrainConfig

DATA = DataConfig("synthetic", limit=200)
TRAIN = TrainConfig(epochs=0, lr=0.02, batch_size=64)
# every one commits at least two rounds, phases or epochs, so a kill halfway leaves finished work to resume
QUICK = {
    "l1": prunekit.L1Config(target="flops=0.5", finetune_epochs=1, schedule=prunekit.RoundSchedule(2)),
    "l2": prunekit.L2Config(target="params=0.5", finetune_epochs=2),
    "bn": prunekit.BNConfig(target="flops=0.5", finetune_epochs=1),
    "taylor": prunekit.TaylorConfig(target="flops=0.5", score_batches=2, finetune_epochs=2),
    "random": prunekit.RandomConfig(target="channels=0.6", schedule=prunekit.RoundSchedule(2)),
    "c-obd": prunekit.COBDConfig(target="flops=0.5", curvature=prunekit.FisherSettings(fisher_batches=2),
                                 finetune_epochs=2),
    "c-obs": prunekit.COBSConfig(target="flops=0.5", curvature=prunekit.FisherSettings(fisher_batches=2),
                                 schedule=prunekit.RoundSchedule(2)),
    "kron-obd": prunekit.KronOBDConfig(target="flops=0.5", curvature=prunekit.FisherSettings(fisher_batches=2),
                                       finetune_epochs=2),
    "kron-obs": prunekit.KronOBSConfig(target="flops=0.5", curvature=prunekit.FisherSettings(fisher_batches=2),
                                       finetune_epochs=1),
    "eigendamage": prunekit.EigenDamageConfig(target="flops=0.5", curvature=prunekit.FisherSettings(fisher_batches=2),
                                              schedule=prunekit.RoundSchedule(2), finetune_epochs=1),
    "admm": prunekit.ADMMConfig(target="params=0.2", stages={"rates": (2,)}, quant="bits=4", admm_epochs=1,
                                retrain_epochs=1, quant_steps=(0.5, 1.0)),
    # the authors' recipe: the logits' own Adam (its moments go through every commit), a normal start
    "dpp": prunekit.DPPConfig(k=1, n=4, quant="bits=8", epochs=2, logit_init="normal", logit_optimizer="adam",
                              temperature=prunekit.TemperatureSchedule(5.0, 0.5, "linear"), entropy_weight=0.01),
    # rank updates every step so that two epochs of a tiny run move the probabilities and penalties
    "spp": prunekit.SPPConfig(target="flops=0.5", epochs=2, interval=1),
    "increg": prunekit.IncRegConfig(target="flops=0.5", epochs=2, interval=1),
    "sdprun": prunekit.SDprunConfig(target="flops=0.5", epochs=2),
    "djpq": prunekit.DJPQConfig(bops=0.5, epochs=2),
}
REPORT_KEYS = {"format", "title", "method", "paper", "recipe", "dense", "runs"}
RUN_KEYS = {"config", "compressed", "storage", "rounds", "notes", "results", "encoding", "changes", "kept_width",
            "model"}
STORAGE_KEYS = {"dense_bits", "compressed_bits", "format", "bits_by_format", "compression", "values"}


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """A ResNet-20 (width 0.25: BatchNorm, residual groups) trained for one epoch on the synthetic data."""
    out = tmp_path_factory.mktemp("registry") / "dense"
    return train_job("resnet20", DATA, TrainConfig(epochs=1, batch_size=64), out, width=0.25, progress=False,
                     log=lambda *_: None, measure_latency=False).checkpoint


def _job(dense: Path, name: str, out: Path, resume: bool = False, log=lambda *_: None) -> prunekit.JobResult:
    return prunekit.prune_job(QUICK[name], checkpoint=dense, train=TRAIN, out=out, resume=resume,
                              measure_latency=False, progress=False, log=log)


def test_every_method_has_a_quick_config():
    assert sorted(QUICK) == prunekit.list_methods()
    assert all(prunekit.method_for(config).name == name for name, config in QUICK.items())


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(QUICK))
def test_a_method_runs_through_the_one_runner(dense, tmp_path, name):
    out = tmp_path / "out"
    result = _job(dense, name, out)
    (label, run), = result.runs.items()
    assert sorted(p.name for p in out.iterdir() if p.suffix in (".yaml", ".json", ".md")) == \
        ["recipe.yaml", "report.json", "report.md"]
    assert (out / label / "run.json").is_file() and (out / label / "model.safetensors").is_file()
    report = json.loads((out / "report.json").read_text())
    assert set(report) == REPORT_KEYS and report["format"] == "prunekit.report/2" and report["method"] == name
    assert set(report["runs"][label]) == RUN_KEYS and set(report["runs"][label]["storage"]) == STORAGE_KEYS
    storage = report["runs"][label]["storage"]
    assert storage["compressed_bits"] < storage["dense_bits"]  # every quick config compresses
    assert report["runs"][label]["compressed"]["test_acc"] == pytest.approx(run.compressed["test_acc"])
    # the saved model is the measured one
    model, meta = load_compressed(out / label / "model.safetensors")
    x = torch.randn(5, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x), run.model.eval()(x), rtol=0, atol=1e-6)
    assert meta["method"] == name and meta["config"] == QUICK[name].to_dict()
    # the written recipe is the job
    recipe = prunekit.Recipe.from_yaml((out / "recipe.yaml").read_text())
    assert recipe.method == name and recipe.configs == [QUICK[name]]
    assert yaml.safe_load((out / "recipe.yaml").read_text())["format"] == "prunekit.recipe/1"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(QUICK))
def test_a_method_resumes_exactly_after_a_kill(dense, tmp_path, name):
    """Killed halfway through its writes (after a round, phase or epoch was committed), the run resumes to exactly
    the tensors of an uninterrupted run."""
    reference, writes = counting_replaces(lambda: _job(dense, name, tmp_path / "reference"))
    (label, _), = reference.runs.items()
    expected = load_file(str(tmp_path / "reference" / label / "model.safetensors"))
    out = tmp_path / "killed"
    assert run_killed(lambda: _job(dense, name, out), max(3, writes // 2)) == KILLED
    assert not (out / "report.json").exists()  # the kill came before the end
    lines: list[str] = []
    _job(dense, name, out, resume=True, log=lines.append)
    resumed = [line for line in lines if line.startswith(("resuming after", "phase "))]
    assert resumed, f"{name} did not continue any saved round, phase or epoch: {lines[:8]}"
    got = load_file(str(out / label / "model.safetensors"))
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    again = _job(dense, name, out, resume=True)  # a finished run resumes to itself
    assert again.runs[label].compressed["test_acc"] == reference.runs[label].compressed["test_acc"]


@pytest.mark.parametrize("name", sorted(QUICK))
def test_every_config_round_trips(name):
    config = QUICK[name]
    cls = prunekit.get_method(name).config
    assert cls.from_dict(config.to_dict()) == config
    assert cls.from_yaml(config.to_yaml()) == config
    assert cls.from_json(config.to_json()) == config
    assert cls() == cls.from_dict({})  # every field has a default


def test_unknown_methods_and_configs_are_named():
    expected = r"unknown method 'kron-ods'; known methods: admm, .*Did you mean kron-obs, kron-obd"
    with pytest.raises(ValueError, match=expected):
        prunekit.get_method("kron-ods")
    with pytest.raises(TypeError, match="TrainConfig is not the config of a registered method; pass one of"):
        prunekit.prune_(torch.nn.Linear(2, 2), TrainConfig(), None)


def test_one_job_runs_one_method(dense):
    with pytest.raises(TypeError, match="one job runs one method"):
        prunekit.prune_job([prunekit.L1Config(), prunekit.L2Config()], checkpoint=dense)
