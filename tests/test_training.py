"""Training: it learns, it ends on the best-validation weights, resume is bit-exact, divergence is caught
with the earlier checkpoint intact, and TrainConfig validates and round-trips."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.utils.data import TensorDataset

from prunekit.data import DataSplits
from prunekit.models import ModelConfig
from prunekit.models.lenet import LeNet300
from prunekit.persistence.checkpoint import CheckpointError, load_model, load_state, read_metadata
from prunekit.training import (
    Augment,
    Schedule,
    TrainConfig,
    TrainHooks,
    TrainingDivergedError,
    augment_batch,
    evaluate,
    fit,
)


def _same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _without_timing(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


# ------------------------------------------------------------------------------------------------- learning


def test_training_lowers_the_loss(synthetic, make_lenet300):
    model = make_lenet300()
    before = evaluate(model, synthetic.val)
    result = fit(model, synthetic, TrainConfig(epochs=3, batch_size=128, lr=0.1), progress=False)
    after = evaluate(model, synthetic.val)
    losses = [row["train_loss"] for row in result.history]
    assert losses == sorted(losses, reverse=True) and losses[-1] < 0.5 * losses[0]
    assert after["loss"] < 0.5 * before["loss"]
    assert after["acc"] > 0.9 > before["acc"]
    assert [row["epoch"] for row in result.history] == [1, 2, 3]


def test_evaluate_matches_a_hand_count(synthetic, make_lenet300):
    model = make_lenet300()
    x, y = synthetic.val.tensors
    with torch.no_grad():
        logits = model(x)
    expected_acc = (logits.argmax(1) == y).float().mean().item()
    expected_loss = torch.nn.functional.cross_entropy(logits, y).item()
    got = evaluate(model, synthetic.val, batch_size=7)  # several uneven batches
    assert got["acc"] == pytest.approx(expected_acc) and got["loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert model.training  # evaluate restores the mode it found


def _noisy_validation(data: DataSplits) -> DataSplits:
    """Same images, random validation labels: validation accuracy wanders, so the best epoch is not the last."""
    x, y = data.val.tensors
    labels = torch.randint(0, data.num_classes, y.shape, generator=torch.Generator().manual_seed(0))
    return DataSplits(data.train, TensorDataset(x, labels), data.test, data.num_classes, data.in_channels,
                      data.input_size, data.config)


def test_best_validation_weights_are_restored(tmp_path, synthetic, make_lenet300):
    data = _noisy_validation(synthetic)
    config = TrainConfig(epochs=5, batch_size=128, lr=0.05)
    model = make_lenet300()
    result = fit(model, data, config, tmp_path, progress=False)
    val_accs = [row["val_acc"] for row in result.history]
    assert result.best_epoch == 1 + val_accs.index(max(val_accs))
    assert result.best_epoch < config.epochs, "the test needs a best epoch before the last one"
    assert result.best_val_acc == max(val_accs) == evaluate(model, data.val)["acc"]
    assert _same_state(model.state_dict(), load_state(tmp_path / "best.safetensors"))
    assert not _same_state(model.state_dict(), load_state(tmp_path / "last.safetensors"))
    assert read_metadata(tmp_path / "best.safetensors")["epoch"] == result.best_epoch
    assert read_metadata(tmp_path / "last.safetensors")["epoch"] == config.epochs

    # Without out_dir the best weights are kept in memory: same training, same final weights.
    in_memory = make_lenet300()
    result_mem = fit(in_memory, data, config, progress=False)
    assert (result_mem.best_epoch, result_mem.best_val_acc) == (result.best_epoch, result.best_val_acc)
    assert _same_state(in_memory.state_dict(), model.state_dict())


def test_hook_param_groups_scale_the_learning_rate_and_set_their_own_decay(synthetic, make_lenet300):
    model = make_lenet300()
    frozen, decayed = model.fc1.weight, model.fc2.weight
    others = [p for p in model.parameters() if p is not frozen and p is not decayed]

    class Groups(TrainHooks):
        def param_groups(self, model):  # lr x0 and no decay: stays put; lr x1 and huge decay: shrinks
            return [{"params": others}, {"params": [frozen], "lr_scale": 0.0, "weight_decay": 0.0},
                    {"params": [decayed], "weight_decay": 5.0}]

    before = frozen.detach().clone(), decayed.detach().norm()
    fit(model, synthetic, TrainConfig(epochs=1, lr=0.05, weight_decay=0.0), progress=False, hooks=Groups(),
        select_best=False)
    assert torch.equal(frozen, before[0])
    assert decayed.norm() < 0.5 * before[1]


def test_zero_epochs_only_evaluates(synthetic, make_lenet300):
    model = make_lenet300()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = fit(model, synthetic, TrainConfig(epochs=0), progress=False)
    assert result.history == [] and result.best_epoch == 0
    assert result.best_val_acc == evaluate(model, synthetic.val)["acc"]
    assert _same_state(before, model.state_dict())


# --------------------------------------------------------------------------------------------------- resume


@pytest.mark.parametrize("augment", [Augment.NONE, Augment.CROP_FLIP])
def test_resume_equals_uninterrupted(tmp_path, synthetic, make_lenet300, augment):
    config = TrainConfig(epochs=3, batch_size=128, lr=0.05, augment=augment, seed=1)
    straight = make_lenet300()
    result_a = fit(straight, synthetic, config, tmp_path / "a", progress=False)

    def interrupt_in_epoch_2(message: str) -> None:
        # fit() logs an epoch *before* saving it, so this leaves epoch 1 on disk, as a Ctrl-C during epoch 2 would.
        if message.startswith("epoch 2/3"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(make_lenet300(), synthetic, config, tmp_path / "b", progress=False, log=interrupt_in_epoch_2)
    assert read_metadata(tmp_path / "b" / "last.safetensors")["epoch"] == 1

    resumed = make_lenet300(seed=123)  # its initial weights must not matter
    messages: list[str] = []
    result_b = fit(resumed, synthetic, config, tmp_path / "b", resume=True, progress=False, log=messages.append)
    assert messages[0] == f"resuming after epoch 1 of 3 from {tmp_path / 'b'}"
    assert len(messages) == 3  # the resume line, then epochs 2 and 3 only

    assert _same_state(load_state(tmp_path / "a" / "last.safetensors"), load_state(tmp_path / "b" / "last.safetensors"))
    assert _same_state(straight.state_dict(), resumed.state_dict())
    assert _without_timing(result_a.history) == _without_timing(result_b.history)
    assert (result_a.best_epoch, result_a.best_val_acc) == (result_b.best_epoch, result_b.best_val_acc)


def test_resume_of_a_finished_run_changes_nothing(tmp_path, synthetic, make_lenet300):
    config = TrainConfig(epochs=2, batch_size=128)
    model = make_lenet300()
    fit(model, synthetic, config, tmp_path, progress=False)
    again = make_lenet300(seed=5)
    result = fit(again, synthetic, config, tmp_path, resume=True, progress=False)
    assert len(result.history) == 2
    assert _same_state(again.state_dict(), model.state_dict())


def test_resume_needs_an_out_dir(synthetic, make_lenet300):
    with pytest.raises(ValueError, match="resume=True needs out_dir"):
        fit(make_lenet300(), synthetic, TrainConfig(epochs=1), resume=True, progress=False)


def test_resume_with_nothing_saved(tmp_path, synthetic, make_lenet300):
    with pytest.raises(CheckpointError, match=f"nothing to resume in {tmp_path}"):
        fit(make_lenet300(), synthetic, TrainConfig(epochs=1), tmp_path, resume=True, progress=False)


def test_resume_with_different_settings(tmp_path, synthetic, make_lenet300):
    fit(make_lenet300(), synthetic, TrainConfig(epochs=1, batch_size=128), tmp_path, progress=False)
    with pytest.raises(CheckpointError, match=r"training settings differ \(lr: saved 0\.05 vs now 0\.1\)"):
        fit(make_lenet300(), synthetic, TrainConfig(epochs=1, batch_size=128, lr=0.1), tmp_path, resume=True,
            progress=False)


def test_resume_with_corrupted_state(tmp_path, synthetic, make_lenet300):
    fit(make_lenet300(), synthetic, TrainConfig(epochs=1, batch_size=128), tmp_path, progress=False)
    (tmp_path / "train_state.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="train_state.pt is corrupted"):
        fit(make_lenet300(), synthetic, TrainConfig(epochs=1, batch_size=128), tmp_path, resume=True,
            progress=False)


def test_train_state_loads_with_weights_only(tmp_path, synthetic, make_lenet300):
    fit(make_lenet300(), synthetic, TrainConfig(epochs=1, batch_size=128), tmp_path, progress=False)
    state = torch.load(tmp_path / "train_state.pt", weights_only=True)
    assert state["config"] == TrainConfig(epochs=1, batch_size=128).to_dict()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.safetensors", "last.safetensors", "train_state.pt"]


# ------------------------------------------------------------------------------------------------ NaN guard


class _NaNAfter(LeNet300):
    """LeNet-300-100 whose training forward returns NaN after ``good_steps`` steps."""

    def __init__(self, config: ModelConfig, good_steps: int) -> None:
        super().__init__(config)
        self.good_steps, self.steps = good_steps, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if self.training:
            self.steps += 1
            if self.steps > self.good_steps:
                return out * float("nan")
        return out


def test_nan_loss_raises_and_keeps_the_earlier_checkpoint(tmp_path, synthetic):
    config = ModelConfig(name="lenet300", num_classes=4, in_channels=1, input_size=12)
    torch.manual_seed(0)
    model = _NaNAfter(config, good_steps=4)  # 461 examples / batch 128 = 4 steps: epoch 1 is fine
    with pytest.raises(TrainingDivergedError) as info:
        fit(model, synthetic, TrainConfig(epochs=3, batch_size=128), tmp_path, progress=False,
            metadata={"model": config.to_dict()})
    message = str(info.value)
    assert message.startswith("loss became nan at epoch 2, step 1 (lr ")
    assert f"the last good checkpoint is {tmp_path / 'last.safetensors'}" in message
    assert "lower --lr" in message

    rebuilt, meta = load_model(tmp_path / "last.safetensors")
    assert meta["epoch"] == 1
    # The bad step was caught before any update, so the model still holds exactly the epoch-1 weights.
    assert _same_state(rebuilt.state_dict(), model.state_dict())
    assert evaluate(rebuilt, synthetic.val)["acc"] > 0.5
    torch.load(tmp_path / "train_state.pt", weights_only=True)
    assert not list(tmp_path.glob(".*.tmp*"))


def test_huge_learning_rate_diverges_with_a_clear_message(synthetic, make_lenet300):
    with pytest.raises(TrainingDivergedError, match=r"loss became (nan|inf) at epoch 1, step \d+ .*lower --lr"):
        fit(make_lenet300(), synthetic, TrainConfig(epochs=2, batch_size=64, lr=1e30), progress=False)


def test_no_diverged_epoch_is_saved_as_a_checkpoint(tmp_path, synthetic, make_lenet300):
    # One step per epoch: the single step of epoch 1 blows the weights up, so validation is already NaN.
    with pytest.raises(TrainingDivergedError, match="validation loss became nan after epoch 1"):
        fit(make_lenet300(), synthetic, TrainConfig(epochs=3, batch_size=1024, lr=1e30), tmp_path, progress=False)
    assert not (tmp_path / "last.safetensors").exists()


class _Poisonable(torch.nn.Module):
    """Wraps a model; once ``poisoned`` is set its outputs are NaN (a divergence on demand)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.poisoned = inner, False

    def forward(self, x):
        out = self.inner(x)
        return out * float("nan") if self.poisoned else out


def test_last_good_checkpoint_named_after_divergence_is_finite(tmp_path, synthetic, make_lenet300):
    model = _Poisonable(make_lenet300())

    def poison_after_first_epoch(message: str) -> None:
        if message.startswith("epoch 1/"):
            model.poisoned = True  # epoch 1 is saved right after this line is logged

    with pytest.raises(TrainingDivergedError, match=r"at epoch 2, step 1 .*last good checkpoint is .*last"):
        fit(model, synthetic, TrainConfig(epochs=3, batch_size=128), tmp_path, progress=False,
            log=poison_after_first_epoch)
    reloaded = _Poisonable(make_lenet300())
    reloaded.load_state_dict(load_state(tmp_path / "last.safetensors"))
    assert math.isfinite(evaluate(reloaded, synthetic.val)["loss"])


# --------------------------------------------------------------------------------------------- augmentation


def _shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """x moved down by dy and right by dx, zero-filled (x is C, H, W)."""
    out = torch.zeros_like(x)
    h, w = x.shape[-2:]
    out[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        x[:, max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)]
    return out


@pytest.mark.parametrize("mode", [Augment.CROP, Augment.CROP_FLIP])
def test_augment_is_a_shift_and_maybe_a_flip(mode):
    x = torch.randn(32, 2, 16, 16, generator=torch.Generator().manual_seed(0))
    out = augment_batch(x, mode, torch.Generator().manual_seed(1))
    pad = 16 // 8
    flips = 0
    for original, augmented in zip(x, out, strict=True):
        candidates = [(f, dy, dx) for f in ([False, True] if mode is Augment.CROP_FLIP else [False])
                      for dy in range(-pad, pad + 1) for dx in range(-pad, pad + 1)
                      if torch.equal(augmented, _shift(original.flip(-1) if f else original, dy, dx))]
        assert candidates, "every output is the input shifted by at most 1/8 of the side (and maybe mirrored)"
        flips += candidates[0][0]
    assert 0 < flips < 32 if mode is Augment.CROP_FLIP else flips == 0
    again = augment_batch(x, mode, torch.Generator().manual_seed(1))
    assert torch.equal(out, again)


def test_no_augmentation_is_the_identity():
    x = torch.randn(4, 1, 8, 8)
    assert augment_batch(x, Augment.NONE, torch.Generator()) is x


# ---------------------------------------------------------------------------------------------- TrainConfig


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"epochs": -1}, r"epochs must be a non-negative int, got -1"),
        ({"epochs": 2.5}, r"epochs must be a non-negative int, got 2.5"),
        ({"epochs": True}, r"epochs must be a non-negative int, got True"),
        ({"batch_size": 0}, r"batch_size must be a positive int, got 0"),
        ({"lr": 0.0}, r"lr must be a positive finite number, got 0.0"),
        ({"lr": float("inf")}, r"lr must be a positive finite number, got inf"),
        ({"lr": float("nan")}, r"lr must be a positive finite number, got nan"),
        ({"momentum": 1.0}, r"momentum must be in \[0, 1\), got 1.0"),
        ({"weight_decay": -1e-4}, r"weight_decay must be >= 0, got -0.0001"),
        ({"schedule": "linear"}, r"schedule must be one of 'cosine', 'step', got 'linear'"),
        ({"augment": "mixup"}, r"augment must be one of 'none', 'crop', 'crop-flip', got 'mixup'"),
        ({"milestones": (0.75, 0.5)}, r"milestones must be increasing fractions in \(0, 1\)"),
        ({"milestones": (0.5, 1.0)}, r"milestones must be increasing fractions in \(0, 1\)"),
        ({"gamma": 0.0}, r"gamma must be in \(0, 1\], got 0.0"),
        ({"gamma": 2.0}, r"gamma must be in \(0, 1\], got 2.0"),
    ],
)
def test_train_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_train_config_accepts_enum_values_as_strings():
    config = TrainConfig(schedule="step", augment="crop-flip", milestones=[0.3, 0.6])
    assert config.schedule is Schedule.STEP and config.augment is Augment.CROP_FLIP
    assert config.milestones == (0.3, 0.6)


def test_train_config_round_trips_through_dict_and_json():
    config = TrainConfig(epochs=7, batch_size=32, lr=0.1, momentum=0.8, nesterov=False, weight_decay=1e-3,
                         schedule=Schedule.STEP, milestones=(0.25, 0.5, 0.9), gamma=0.2, augment=Augment.CROP, seed=3)
    as_dict = config.to_dict()
    assert as_dict["schedule"] == "step" and as_dict["augment"] == "crop" and as_dict["milestones"] == [0.25, 0.5, 0.9]
    assert TrainConfig.from_dict(as_dict) == config
    assert TrainConfig.from_dict(json.loads(json.dumps(as_dict))) == config


def test_train_config_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match=r"unknown TrainConfig fields \['cooldown'\]; accepted: \[.*'epochs'"):
        TrainConfig.from_dict({"epochs": 1, "cooldown": 5})


def test_cosine_schedule():
    config = TrainConfig(lr=0.2, schedule="cosine")
    assert config.lr_at(0.0) == pytest.approx(0.2)
    assert config.lr_at(0.5) == pytest.approx(0.1)
    assert config.lr_at(1.0) == pytest.approx(0.0, abs=1e-12)
    values = [config.lr_at(p / 20) for p in range(21)]
    assert values == sorted(values, reverse=True)


def test_warmup_rises_from_a_25th_then_the_schedule_runs_over_the_rest():
    config = TrainConfig(lr=0.25, warmup=0.2)
    assert config.lr_at(0.0) == pytest.approx(0.01) and config.lr_at(0.1) == pytest.approx(0.13)
    assert config.lr_at(0.2) == pytest.approx(0.25) and config.lr_at(0.6) == pytest.approx(0.125)
    assert config.lr_at(1.0) == pytest.approx(0.0, abs=1e-12)
    step = TrainConfig(lr=1.0, schedule="step", milestones=(0.5,), warmup=0.5)
    assert step.lr_at(0.7) == 1.0 and step.lr_at(0.75) == pytest.approx(0.1)  # half of the rest
    for bad in (-0.1, 1.0, True):
        with pytest.raises(ValueError, match="warmup must be a fraction of the steps in"):
            TrainConfig(warmup=bad)


def test_a_run_saved_before_a_setting_existed_resumes_with_its_default(tmp_path, synthetic, make_lenet300):
    fit(make_lenet300(), synthetic, TrainConfig(epochs=1, batch_size=128), tmp_path, progress=False)
    state = torch.load(tmp_path / "train_state.pt", weights_only=True)
    del state["config"]["warmup"]  # as written by a prunekit without warm-up
    torch.save(state, tmp_path / "train_state.pt")
    fit(make_lenet300(), synthetic, TrainConfig(epochs=1, batch_size=128), tmp_path, resume=True, progress=False)
    with pytest.raises(CheckpointError, match=r"\(warmup: saved 0\.0 vs now 0\.1\)"):
        fit(make_lenet300(), synthetic, TrainConfig(epochs=1, batch_size=128, warmup=0.1), tmp_path, resume=True,
            progress=False)


def test_step_schedule():
    config = TrainConfig(lr=1.0, schedule="step", milestones=(0.5, 0.75), gamma=0.1)
    assert [config.lr_at(p) for p in (0.0, 0.49)] == [1.0, 1.0]
    assert config.lr_at(0.5) == pytest.approx(0.1) and config.lr_at(0.74) == pytest.approx(0.1)
    assert config.lr_at(0.75) == pytest.approx(0.01) and config.lr_at(1.0) == pytest.approx(0.01)


def test_fit_follows_the_schedule(synthetic, make_lenet300):
    config = TrainConfig(epochs=2, batch_size=128, lr=0.04, schedule="step", milestones=(0.5,), gamma=0.5)
    result = fit(make_lenet300(), synthetic, config, progress=False)
    # 4 steps per epoch, 8 in all: the last step of epoch 1 is at progress 3/8, of epoch 2 at 7/8.
    assert [row["lr"] for row in result.history] == [pytest.approx(0.04), pytest.approx(0.02)]
