"""Structural pruning jobs: score channel groups, allocate, shrink physically, re-estimate BatchNorm, fine-tune.

One-shot is a single round; iterative runs ``iterations`` rounds of prune + fine-tune with geometrically spaced
targets (round ``r`` keeps ``keep ** (r / k)`` of the dense metric). Every finished round is saved
(``round_R/pruned.safetensors``: weights + the architecture changes so far) and ``resume=True`` continues from
the last finished round, and inside a round from the last finished fine-tuning epoch.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from prunekit.channels.criteria import CRITERIA, Criterion, score_groups
from prunekit.channels.graph import ChannelGraph
from prunekit.configs import config_from_dict
from prunekit.curvature.kfac import CurvatureConfig
from prunekit.curvature.obs import CURVATURE_CRITERIA
from prunekit.data import DataSplits
from prunekit.measurement.metrics import count_flops, count_params
from prunekit.methods.eigendamage import EigenDamageConfig, KFEBottleneck, eigendamage_round_, set_rotations_trainable_
from prunekit.persistence.architecture import load_compressed, save_compressed
from prunekit.persistence.checkpoint import CheckpointError, atomic_write, read_metadata, state_fingerprint
from prunekit.planning.allocation import AllocationConfig, CostModel, Target, plan_for_target
from prunekit.recovery.reconstruction import reconstruct_
from prunekit.training import TrainConfig, evaluate, fit

EIGENDAMAGE = "eigendamage"
MAX_ITERATIONS = 100  # every round scores, shrinks and fine-tunes; more rounds than this is a typo, not a schedule


@dataclass(frozen=True)
class PruneConfig:
    """What to prune and how.

    Args:
        method: Criterion name (``prunekit list methods``).
        target: :class:`~prunekit.planning.allocation.Target` or its text form (``"flops=0.25"``).
        allocation: :class:`~prunekit.planning.allocation.AllocationConfig` (uniform/global, per-layer cap).
        iterations: Rounds of prune + fine-tune (1 = one-shot).
        ignore: Module names to leave alone (the output layer always is).
        score_batches: Training batches (of 64) a data-driven criterion sees.
        bn_recalibration_images: Training images used to re-estimate BatchNorm statistics after each
            shrink (0 disables it).
        reconstruction_images: Training images for the layer-wise least-squares re-fit of the channel methods
            (:func:`prunekit.recovery.reconstruction.reconstruct_`) before each shrink; 0 disables it.
        seed: Seed of the random criterion and of data order for scoring.
        curvature: :class:`~prunekit.curvature.kfac.CurvatureConfig` of the curvature criteria (C-OBD, C-OBS,
            Kron-OBD, Kron-OBS, EigenDamage): Fisher type, batches, damping, OBS update.
        eigendamage: :class:`~prunekit.methods.eigendamage.EigenDamageConfig` (bottleneck form, trainable rotations).
    """

    method: str = "l1"
    target: Target | str = "flops=0.5"
    allocation: AllocationConfig = AllocationConfig()
    iterations: int = 1
    ignore: tuple[str, ...] = ()
    score_batches: int = 8
    bn_recalibration_images: int = 512
    reconstruction_images: int = 256
    seed: int = 0
    curvature: CurvatureConfig = CurvatureConfig()
    eigendamage: EigenDamageConfig = EigenDamageConfig()

    def __post_init__(self) -> None:
        if self.method not in CRITERIA and self.method != EIGENDAMAGE:
            CRITERIA.get(self.method)
        if isinstance(self.curvature, dict):
            object.__setattr__(self, "curvature", CurvatureConfig.from_dict(self.curvature))
        if isinstance(self.eigendamage, dict):
            object.__setattr__(self, "eigendamage", EigenDamageConfig.from_dict(self.eigendamage))
        if isinstance(self.target, str):
            object.__setattr__(self, "target", Target.parse(self.target))
        if self.method == EIGENDAMAGE and self.target.metric.value == "channels":
            raise ValueError("eigendamage removes eigen-directions, not channels: give a flops= or params= target")
        if isinstance(self.allocation, dict):
            object.__setattr__(self, "allocation", AllocationConfig(**self.allocation))
        object.__setattr__(self, "ignore", tuple(self.ignore))
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or \
                not 1 <= self.iterations <= MAX_ITERATIONS:
            raise ValueError(f"iterations must be an int >= 1 and at most {MAX_ITERATIONS} (rounds of prune + "
                             f"fine-tune; iterative pruning uses 3 to 10), got {self.iterations!r}")
        if self.score_batches < 1:
            raise ValueError(f"score_batches must be >= 1, got {self.score_batches!r}")
        if self.bn_recalibration_images < 0:
            raise ValueError(f"bn_recalibration_images must be >= 0, got {self.bn_recalibration_images!r}")
        if self.reconstruction_images < 0:
            raise ValueError(f"reconstruction_images must be >= 0, got {self.reconstruction_images!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "target": str(self.target), "allocation": self.allocation.to_dict(),
                "iterations": self.iterations, "ignore": list(self.ignore), "score_batches": self.score_batches,
                "bn_recalibration_images": self.bn_recalibration_images,
                "reconstruction_images": self.reconstruction_images, "seed": self.seed,
                "curvature": self.curvature.to_dict(), "eigendamage": self.eigendamage.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruneConfig:
        return config_from_dict(cls, data)


@dataclass
class RoundResult:
    round: int
    target_keep: float
    predicted_keep: float
    params: int
    flops: int
    removed_channels: int
    val_acc_pruned: float
    val_acc_finetuned: float | None
    seconds_scoring: float
    seconds_finetune: float


@dataclass
class PruneResult:
    """The pruned model (best fine-tuned weights), its architecture changes and a record of every round."""

    model: nn.Module
    changes: list[dict[str, Any]]
    rounds: list[RoundResult] = field(default_factory=list)
    val_acc_before_finetune: float | None = None
    test_acc_before_finetune: float | None = None
    kept_width: dict[str, tuple[int, int]] = field(default_factory=dict)  # layer -> (kept, dense)
    checkpoint: Path | None = None


@torch.no_grad()
def recalibrate_batchnorm_(model: nn.Module, data: DataSplits, images: int = 512, batch_size: int = 64) -> None:
    """Re-estimate every BatchNorm's running mean/variance on ``images`` training images (image-weighted average
    of the batch statistics).

    After channels are removed the stored statistics no longer describe the layer inputs; a few hundred images
    are enough to bring a pruned network back from chance-level accuracy without any training.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or images <= 0:
        return
    was_training = model.training
    momenta = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.train()
    device = next(model.parameters()).device
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0))[:images]
    seen = 0
    for start in range(0, len(order), batch_size):
        x, _ = data.train[order[start:start + batch_size]]
        seen += len(x)
        for m in norms:  # momentum = batch / seen: the running mean is the exact per-image average
            m.momentum = len(x) / seen
        model(x.to(device))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.train(was_training)


def score_batches(data: DataSplits, count: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The ``count`` shuffled training batches of 64 a data-driven criterion scores with (round ``r`` of a
    pruning job uses ``seed = config.seed + r``), public so that other tools can be given the same batches."""
    loader = DataLoader(data.train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed))
    for i, batch in enumerate(loader):
        if i >= count:
            return
        yield batch


def make_criterion(config: PruneConfig) -> Criterion:
    """The criterion ``config.method`` names; curvature criteria get ``config.curvature``."""
    factory = CRITERIA.get(config.method)
    if config.method in CURVATURE_CRITERIA:
        return factory(config.curvature)
    return factory()


def layer_widths(model: nn.Module) -> dict[str, int]:
    """Output width of every conv/linear layer."""
    return {n: (m.out_channels if isinstance(m, (nn.Conv1d, nn.Conv2d)) else m.out_features)
            for n, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))}


def prune_model(
    model: nn.Module,
    data: DataSplits,
    config: PruneConfig,
    finetune: TrainConfig | None = None,
    out_dir: str | Path | None = None,
    *,
    base: dict[str, Any] | None = None,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> PruneResult:
    """Prune ``model`` (a copy is not made: it is shrunk in place) to ``config.target``.

    Args:
        base: How to rebuild the unpruned network (a ModelConfig dict or ``{"factory": ...}``); needed to save.
        finetune: Fine-tuning per round (``epochs=0`` or ``None`` skips it).

    Raises:
        InfeasibleTargetError: the target cannot be met under the per-layer cap.
        UnsupportedModelError: a layer or op cannot be shrunk (names it and how to exclude it).
    """
    out = Path(out_dir) if out_dir is not None else None
    if out is not None and base is None:
        raise ValueError("saving a pruned model needs base= (how to rebuild the unpruned network)")
    input_shape = (data.in_channels, data.input_size, data.input_size)
    example = data.train[:2][0]
    dense_widths = layer_widths(model)
    dense_flops, dense_params = count_flops(model, (1, *input_shape)), count_params(model)
    dense_metric = {"flops": dense_flops, "params": dense_params}
    changes: list[dict[str, Any]] = []
    result = PruneResult(model=model, changes=changes)
    dense_sha256 = state_fingerprint(model)
    start_round = 1
    if out is not None:
        _check_or_write_manifest(out, resume, {
            "dense_sha256": dense_sha256, "prune": config.to_dict(), "data": data.config.to_dict(),
            "finetune": finetune.to_dict() if finetune is not None and finetune.epochs > 0 else None})
    if resume and out is not None:
        trusted = [base["factory"]] if base and "factory" in base else []
        start_round, model = _resume(out, config, result, log, dense_sha256, trusted)
        result.model = model
    k = config.iterations
    for r in range(start_round, k + 1):
        round_dir = out / f"round_{r}" if out is not None else None
        target_keep = config.target.keep ** (r / k)
        t0 = time.perf_counter()
        # fraction of the dense metric that earlier rounds already kept; this round's target is relative to it
        metric = config.target.metric.value
        if metric == "channels":
            previous = config.target.keep ** ((r - 1) / k)
        else:
            now = count_flops(model, (1, *input_shape)) if metric == "flops" else count_params(model)
            previous = now / dense_metric[metric]
        relative = Target(config.target.metric, min(0.999, target_keep / previous))
        if config.method == EIGENDAMAGE:
            set_rotations_trainable_(model, config.eigendamage.train_rotations)
            done = eigendamage_round_(
                model, score_batches(data, config.curvature.batches, config.seed + r), example, relative,
                config.curvature, config.allocation.max_per_layer, config.eigendamage, config.ignore,
                final=r == k, progress=progress)
            change, predicted, removed = done.change, done.predicted_keep, done.removed_directions
            what = "eigen-directions"
        else:
            change, predicted, removed = _channel_round(model, data, config, example, input_shape, relative, r)
            what = "channels"
        changes.append(change)
        recalibrate_batchnorm_(model, data, config.bn_recalibration_images)
        seconds_scoring = time.perf_counter() - t0
        val_pruned = evaluate(model, data.val)["acc"]
        if r == 1 or result.val_acc_before_finetune is None:  # reported, never used to choose anything
            result.val_acc_before_finetune = val_pruned
            result.test_acc_before_finetune = evaluate(model, data.test)["acc"]
        log(f"round {r}/{k}: removed {removed} {what}, keeps "
            f"{count_flops(model, (1, *input_shape)) / dense_flops:.3f} of FLOPs and "
            f"{count_params(model) / dense_params:.3f} of params; val acc before fine-tuning {val_pruned:.4f}")
        t1 = time.perf_counter()
        val_ft = None
        if finetune is not None and finetune.epochs > 0:
            fit(model, data, finetune, round_dir / "finetune" if round_dir else None, progress=progress,
                metadata={"model": base, "architecture_changes": changes} if base else None,
                resume=resume and round_dir is not None and (round_dir / "finetune" / "train_state.pt").is_file())
            val_ft = evaluate(model, data.val)["acc"]
            log(f"round {r}/{k}: val acc after fine-tuning {val_ft:.4f}")
        result.rounds.append(RoundResult(
            round=r, target_keep=target_keep, predicted_keep=predicted * previous,
            params=count_params(model), flops=count_flops(model, (1, *input_shape)),
            removed_channels=removed, val_acc_pruned=val_pruned, val_acc_finetuned=val_ft,
            seconds_scoring=seconds_scoring, seconds_finetune=time.perf_counter() - t1))
        if round_dir is not None:
            result.checkpoint = save_compressed(
                round_dir / "pruned.safetensors", model, base, changes,
                {"prune": config.to_dict(), "data": data.config.to_dict(), "round": r, "dense_sha256": dense_sha256,
                 "rounds": [vars(x) for x in result.rounds],
                 "val_acc_before_finetune": result.val_acc_before_finetune,
                 "test_acc_before_finetune": result.test_acc_before_finetune})
    widths = layer_widths(model)
    modules = dict(model.named_modules())
    for n, w in dense_widths.items():
        if isinstance(modules.get(n), KFEBottleneck):
            result.kept_width[n] = (modules[n].rank_out, w)  # the bottleneck's inner width
        elif n in widths:
            result.kept_width[n] = (widths[n], w)
    return result


def _channel_round(model: nn.Module, data: DataSplits, config: PruneConfig, example: torch.Tensor,
                   input_shape: tuple[int, ...], relative: Target, r: int) -> tuple[dict[str, Any], float, int]:
    """Score channel groups, allocate, compensate (OBS) and shrink; returns (change, predicted keep, removed)."""
    graph = ChannelGraph(model, example, ignore=config.ignore)
    if not graph.groups:
        raise ValueError("no prunable channel groups were found; skipped: "
                         + "; ".join(f"{a}: {b}" for a, b in list(graph.skipped.items())[:3]))
    criterion = make_criterion(config)
    if criterion.needs_data:
        batches = config.curvature.batches if config.method in CURVATURE_CRITERIA else config.score_batches
        criterion.prepare(model, graph, score_batches(data, batches, config.seed + r))
    scores = score_groups(criterion, graph)
    cost = CostModel(model, graph, input_shape)
    plan, predicted = plan_for_target(scores, cost, relative, config.allocation)
    reference = copy.deepcopy(model) if config.reconstruction_images else None
    criterion.update_weights_(graph, plan)  # OBS: compensate the remaining weights before removal
    if reference is not None:
        graph.apply_masks_(plan)
        reconstruct_(model, reference, data.train, config.reconstruction_images, masks=graph.masks(plan))
    graph.shrink_(plan)
    change = plan.to_dict()
    if config.ignore:
        change["ignore"] = list(config.ignore)
    return change, predicted, plan.num_removed()


RUN_FORMAT = "prunekit.prune_run/1"


def _check_or_write_manifest(out: Path, resume: bool, run: dict[str, Any]) -> None:
    """``out/run.json`` records what a pruning run is made of (dense network, settings, data, fine-tuning) before
    its first round; a resume must match it, so no round or fine-tuning epoch of another run is ever continued."""
    path = out / "run.json"
    if resume and path.is_file():
        try:
            saved = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path} is unreadable ({exc}); choose another --out") from None
        if not isinstance(saved, dict) or saved.get("format") != RUN_FORMAT:
            raise CheckpointError(f"{path} is not a {RUN_FORMAT} record; choose another --out")
        differs = [k for k, v in run.items() if saved.get(k) != v]
        if differs:
            what = {"dense_sha256": "another dense network (its weights differ)", "prune": "other pruning settings",
                    "data": "other data settings", "finetune": "other fine-tuning settings"}
            raise CheckpointError(f"cannot resume {out}: it was started from " + " and ".join(what[k] for k in differs)
                                  + "; give the original checkpoint and settings, or choose another --out")
        return
    if resume and any(out.glob("round_*")):
        raise CheckpointError(f"cannot resume {out}: it has rounds but no run.json (written by an older prunekit), "
                              "so it cannot be checked against this dense network; choose another --out")
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps({"format": RUN_FORMAT, **run}, indent=1)))


def _resume(out: Path, config: PruneConfig, result: PruneResult, log, dense_sha256: str,
            trusted_factories: list[str]) -> tuple[int, nn.Module]:
    """Continue after the last saved round, refusing a run made with other settings or from another network."""
    done = sorted((int(p.parent.name.split("_")[1]), p) for p in out.glob("round_*/pruned.safetensors")
                  if p.parent.name.split("_")[1].isdigit())
    if not done:
        return 1, result.model
    last_round, path = done[-1]
    meta = read_metadata(path)
    if meta.get("prune") != config.to_dict():
        raise CheckpointError(f"cannot resume {out}: it was pruned with {meta.get('prune')}, not {config.to_dict()}")
    if meta.get("dense_sha256") != dense_sha256:
        saved = meta.get("dense_sha256")
        what = f"weights sha256 {saved[:12]}..." if saved else "a network this version cannot identify"
        raise CheckpointError(f"cannot resume {out}: its rounds were pruned from another dense network ({what}, "
                              f"this one is {dense_sha256[:12]}...); give the original checkpoint or a new --out")
    model, meta = load_compressed(path, trusted_factories)
    result.changes.extend(meta["architecture_changes"])
    result.rounds.extend(RoundResult(**r) for r in meta.get("rounds", []))
    result.val_acc_before_finetune = meta.get("val_acc_before_finetune")
    result.test_acc_before_finetune = meta.get("test_acc_before_finetune")
    result.checkpoint = path
    log(f"resuming after round {last_round} of {config.iterations} from {path}")
    return last_round + 1, model.train()


