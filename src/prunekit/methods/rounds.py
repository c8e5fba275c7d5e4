"""The round loop that the round-based methods share (the channel criteria and EigenDamage): per round of the
:class:`~prunekit.planning.schedule.RoundSchedule`, one method step toward the round's target, recovery
(BatchNorm re-estimation), fine-tuning, and a saved checkpoint.

Every finished round is saved as ``round_R/pruned.safetensors`` (weights plus the architecture changes so far) in
the context's folder; with ``resume`` the loop replays the last saved round onto the model in place and continues
after it, and inside a round from the last committed fine-tuning epoch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.data import DataSplits
from prunekit.measurement.latency_table import (
    LatencySettings,
    LatencyTable,
    latency_table,
    measure_speedup,
)
from prunekit.measurement.metrics import count_flops, count_params
from prunekit.methods.registry import PruneRecord, RunContext
from prunekit.persistence.architecture import replay_changes_, save_compressed
from prunekit.persistence.checkpoint import CheckpointError, check_state_fits, load_state, read_metadata
from prunekit.planning.allocation import InfeasibleTargetError, Target, TargetMetric
from prunekit.planning.schedule import RoundSchedule
from prunekit.recovery.batchnorm import recalibrate_batchnorm_
from prunekit.training import fit


@dataclass
class RoundStep:
    """What one method step did: the replayable change, the fraction of the round's metric it predicts to keep,
    how many units it removed (of what), and measurements to report with the round (``details``)."""

    change: dict[str, Any]
    predicted_keep: float
    removed: int
    what: str
    details: dict[str, Any] = field(default_factory=dict)


Step = Callable[[nn.Module, Target, int], RoundStep]


def layer_widths(model: nn.Module) -> dict[str, int]:
    """Output width of every conv/linear layer."""
    return {n: (m.out_channels if isinstance(m, (nn.Conv1d, nn.Conv2d)) else m.out_features)
            for n, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))}


def target_latency_table(model: nn.Module, data: DataSplits, target: Target, settings: LatencySettings,
                         ctx: RunContext, ignore: tuple[str, ...] = (), bottlenecks: bool = False
                         ) -> LatencyTable | None:
    """The dense network's latency table (cached, or measured now) when ``target`` is a ``latency=`` target."""
    if target.metric is not TargetMetric.LATENCY:
        return None
    return latency_table(model, data.example_inputs(), settings, bottlenecks=bottlenecks, ignore=ignore,
                         progress=ctx.progress, log=ctx.log)


def plan_to_measured_latency(model: nn.Module, input_shape: tuple[int, ...], target: Target,
                             settings: LatencySettings, plan_for: Callable[[Target], tuple[Any, float]],
                             shrunk: Callable[[Any], nn.Module], tolerance: float = 0.05
                             ) -> tuple[Any, float, dict[str, Any]]:
    """A plan for a ``latency=`` target checked by measurement: the network it makes is timed against ``model``
    in the settings' engine; while the measured kept latency misses ``target`` by more than ``tolerance``, the
    target is scaled by the miss and planned again (``settings.corrections`` times). The plan measured closest wins.

    Returns:
        (plan, its predicted kept fraction, ``{"latency_tries": [each try's target, predicted and measured kept
        fraction], "measured_keep": the kept plan's}``).
    """
    keep, tries, best = target.keep, [], None
    for _ in range(1 + settings.corrections):
        try:
            plan, predicted = plan_for(Target(TargetMetric.LATENCY, keep))
        except InfeasibleTargetError:
            if best is None:
                raise
            break  # a corrected target beyond reach: the closest plan so far stands
        measured = 1 / measure_speedup(model, shrunk(plan), input_shape, settings)["speedup"]
        tries.append({"target_keep": keep, "predicted_keep": predicted, "measured_keep": measured})
        if best is None or abs(math.log(measured / target.keep)) < abs(math.log(best[2] / target.keep)):
            best = (plan, predicted, measured)
        if abs(measured / target.keep - 1) <= tolerance:
            break
        keep = min(0.999, max(1e-3, keep * target.keep / measured))
    return best[0], best[1], {"latency_tries": tries, "measured_keep": best[2]}


def measured_rounding_choice(model: nn.Module, input_shape: tuple[int, ...], target: Target,
                             settings: LatencySettings, roundings: list[int],
                             plan_for: Callable[[Target, int], tuple[Any, float]], shrunk: Callable[[Any], nn.Module],
                             importance: Callable[[Any], float], tolerance: float = 0.05
                             ) -> tuple[Any, float, dict[str, Any]]:
    """:func:`plan_to_measured_latency` with kept widths rounded to each of ``roundings``; of the plans measured
    within ``tolerance`` of the target, the one removing the least ``importance`` (else the one measured closest).
    The measurement, not the table, decides whether a fast grid of widths pays.

    Returns:
        (plan, its predicted kept fraction, ``{"round_to", "measured_keep", "latency_tries": {rounding: tries}}``).
    """
    found, error = {}, None
    for r in roundings:
        try:
            found[r] = plan_to_measured_latency(model, input_shape, target, settings, lambda t, r=r: plan_for(t, r),
                                                shrunk, tolerance)
        except InfeasibleTargetError as exc:
            error = error or exc
    if not found:
        raise error

    def miss(r: int) -> float:
        return abs(found[r][2]["measured_keep"] / target.keep - 1)

    reached = [r for r in found if miss(r) <= tolerance]
    best = min(reached, key=lambda r: importance(found[r][0])) if reached else min(found, key=miss)
    plan, predicted, measured = found[best]
    return plan, predicted, {"round_to": best, "measured_keep": measured["measured_keep"],
                             "latency_tries": {str(r): found[r][2]["latency_tries"] for r in found}}


def record_latency(record: PruneRecord, model: nn.Module, table: LatencyTable | None,
                   settings: LatencySettings, how: str) -> None:
    """Put the predicted speedup (dense over pruned, by the table) on ``record`` with a note saying ``how`` the
    target was planned; the job measures the real speedup."""
    if table is None:
        return
    record.latency_settings = settings
    record.predicted_speedup = table.speedup(model)
    record.notes.append(f"latency target measured in {settings.describe()}: per-layer table fitted to the whole "
                        f"network; {how}; predicted speedup {record.predicted_speedup:.2f}x")


def run_rounds(model: nn.Module, data: DataSplits, target: Target, schedule: RoundSchedule, step: Step,
               ctx: RunContext, *, method: str, config: Any, bn_images: int, finetune_epochs: int,
               before_finetune: Callable[[nn.Module], None] = lambda _: None,
               latency: LatencyTable | None = None) -> PruneRecord:
    """Run ``schedule``'s rounds of ``step`` on ``model`` in place, each followed by BatchNorm re-estimation on
    ``bn_images`` images and ``finetune_epochs`` epochs of fine-tuning (best epoch on validation). ``latency``:
    the dense network's table, for a ``latency=`` target.

    Raises:
        CheckpointError: ``ctx.resume`` with a saved round made by other settings.
    """
    if ctx.folder is not None and ctx.base is None:
        raise ValueError("saving rounds needs RunContext.base (how to rebuild the unpruned network, e.g. "
                         "ModelConfig(...).to_dict()); give it or leave RunContext.folder unset")
    flops_inputs = data.flops_inputs()
    dense_flops, dense_params = count_flops(model, flops_inputs), count_params(model)
    dense_metric = {TargetMetric.FLOPS: dense_flops, TargetMetric.PARAMS: dense_params}
    record = PruneRecord(method=method)
    start = 1
    if ctx.resume and ctx.folder is not None:
        start = _resume_(model, ctx.folder, record, data.example_inputs(), method, config, ctx.log)
    k = schedule.iterations
    for r in range(start, k + 1):
        round_dir = ctx.subfolder(f"round_{r}")
        t0 = time.perf_counter()
        # the fraction of the dense metric that earlier rounds already kept; this round's target is relative to it
        if target.metric is TargetMetric.CHANNELS:
            kept_now = target.keep ** ((r - 1) / k)
        elif target.metric is TargetMetric.LATENCY:
            if latency is None:
                raise ValueError("a latency= target needs the dense network's latency table (run_rounds(..., "
                                 "latency=latency_table(...)))")
            measured = [done.get("measured_keep") for done in record.rounds]
            # rounds checked by measurement carry their measured keep, so later rounds do not undo a correction
            kept_now = math.prod(measured) if all(m is not None for m in measured) else 1 / latency.speedup(model)
        else:
            now = count_flops(model, flops_inputs) if target.metric is TargetMetric.FLOPS else count_params(model)
            kept_now = now / dense_metric[target.metric]
        done = step(model, schedule.round_target(r, target, kept_now), r)
        record.changes.append(done.change)
        recalibrate_batchnorm_(model, data, bn_images)
        seconds_pruning = time.perf_counter() - t0
        val_pruned = data.accuracy(model, "val")
        if record.val_acc_before_finetune is None:  # reported, never used to choose anything
            record.val_acc_before_finetune = val_pruned
            record.test_acc_before_finetune = data.accuracy(model, "test")
        ctx.log(f"round {r}/{k}: removed {done.removed} {done.what}, keeps "
                f"{count_flops(model, flops_inputs) / dense_flops:.3f} of FLOPs and "
                f"{count_params(model) / dense_params:.3f} of params; val acc before fine-tuning {val_pruned:.4f}")
        if "output_change" in done.details:
            change = done.details["output_change"]
            ctx.log(f"round {r}/{k}: residual-stream channels removed (not exact): the outputs moved by "
                    f"{change['relative']:.1%} of their scale on the example batch; recovery has to win it back")
        t1 = time.perf_counter()
        val_ft = None
        if finetune_epochs > 0:
            before_finetune(model)
            commit = round_dir / "finetune" if round_dir is not None else None
            resume = ctx.resume and commit is not None and (commit / "train_state.pt").is_file()
            fit(model, data, replace(ctx.train, epochs=finetune_epochs, seed=ctx.seed), commit,
                progress=ctx.progress, resume=resume, log=ctx.log,
                metadata={"model": ctx.base, "architecture_changes": record.changes} if ctx.base else None)
            val_ft = data.accuracy(model, "val")
            ctx.log(f"round {r}/{k}: val acc after fine-tuning {val_ft:.4f}")
        record.rounds.append({
            "round": r, "target_keep": schedule.keep_after(r, target), "predicted_keep": done.predicted_keep * kept_now,
            "params": count_params(model), "flops": count_flops(model, flops_inputs),
            "removed_channels": done.removed, "val_acc_pruned": val_pruned, "val_acc_finetuned": val_ft,
            "seconds_scoring": seconds_pruning, "seconds_finetune": time.perf_counter() - t1, **done.details})
        if round_dir is not None:
            save_compressed(round_dir / "pruned.safetensors", model, ctx.base, record.changes,
                            {"method": method, "config": config.to_dict(), "data": data.config.to_dict(),
                             "round": r, "rounds": record.rounds,
                             "val_acc_before_finetune": record.val_acc_before_finetune,
                             "test_acc_before_finetune": record.test_acc_before_finetune})
    return record


def _resume_(model: nn.Module, folder: Path, record: PruneRecord, example_inputs: Any, method: str,
             config: Any, log: Callable[[str], None]) -> int:
    """Replay the last saved round onto ``model`` (still dense) and load its weights; returns the next round."""
    done = sorted((int(p.parent.name.split("_")[1]), p) for p in folder.glob("round_*/pruned.safetensors")
                  if p.parent.name.split("_")[1].isdigit())
    if not done:
        return 1
    last, path = done[-1]
    meta = read_metadata(path)
    if meta.get("method") != method or meta.get("config") != config.to_dict():
        raise CheckpointError(f"cannot resume {folder}: it was pruned with {meta.get('method')} "
                              f"{meta.get('config')}, not {method} {config.to_dict()}")
    replay_changes_(model, meta.get("architecture_changes", []), example_inputs)
    state = load_state(path)
    check_state_fits(model, state, path)
    model.load_state_dict(state)
    record.changes.extend(meta.get("architecture_changes", []))
    record.rounds.extend(meta.get("rounds", []))
    record.val_acc_before_finetune = meta.get("val_acc_before_finetune")
    record.test_acc_before_finetune = meta.get("test_acc_before_finetune")
    log(f"resuming after round {last} from {path}")
    return last + 1


def kept_widths(model: nn.Module, dense_widths: dict[str, int]) -> dict[str, tuple[int, int]]:
    """Layer -> (kept, dense) output width; for an EigenDamage bottleneck, its inner rank."""
    widths = layer_widths(model)
    modules = dict(model.named_modules())
    out = {}
    for n, w in dense_widths.items():
        inner = getattr(modules.get(n), "rank_out", None)
        if inner is not None:
            out[n] = (inner, w)
        elif n in widths:
            out[n] = (widths[n], w)
    return out


def score_batches(data: DataSplits, count: int, seed: int) -> Iterator[tuple[Any, torch.Tensor]]:
    """The ``count`` shuffled training batches a data-driven criterion scores with (round ``r`` of a run uses
    ``seed + r``, so a resumed run sees the same ones), public so that other tools can be given the same
    batches: ``data.scoring_batches(count, seed)``."""
    yield from data.scoring_batches(count, seed)
