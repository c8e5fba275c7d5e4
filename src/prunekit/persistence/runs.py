"""Run folders: ``run.json`` ties a folder to what its run is made of (the dense network's fingerprint, the method
and its settings, the data, the training settings, the seed), written before the first round or phase; a resume
must match it, so no round, phase or epoch of another run is ever continued."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prunekit.persistence.checkpoint import CheckpointError, atomic_write

RUN_FORMAT = "prunekit.run/2"
_WHAT = {"dense_sha256": "another dense network (its weights differ)", "method": "another method",
         "config": "other method settings", "data": "other data settings", "train": "other training settings",
         "seed": "another seed"}


def check_or_write_manifest(folder: Path, resume: bool, run: dict[str, Any], write: bool = True) -> None:
    """Write ``folder/run.json`` for a fresh run; with ``resume``, check an existing one against ``run``.
    ``write=False`` only checks (a job checks every run before it writes anything).

    Raises:
        CheckpointError: the saved run differs (naming what), is unreadable, or a folder with saved work has no
            record to check against.
    """
    path = Path(folder) / "run.json"
    run = json.loads(json.dumps(run))  # as it reads back (tuples as lists)
    if path.is_file() and not resume:
        raise CheckpointError(f"{folder} already holds a run ({path}); resume it or choose another folder")
    if resume and path.is_file():
        try:
            saved = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path} is unreadable ({exc}); choose another --out") from None
        if not isinstance(saved, dict) or saved.get("format") != RUN_FORMAT:
            raise CheckpointError(f"{path} is not a {RUN_FORMAT} record (written by an older prunekit?); choose "
                                  "another --out")
        if isinstance(saved.get("train"), dict) and isinstance(run.get("train"), dict):
            from prunekit.training import TrainConfig  # a training setting added since the run started: its default

            saved["train"] = {**TrainConfig().to_dict(), **saved["train"]}
        differs = [k for k, v in run.items() if saved.get(k) != v]
        if differs:
            raise CheckpointError(f"cannot resume {folder}: it was started from "
                                  + " and ".join(_WHAT.get(k, k) for k in differs)
                                  + "; give the original checkpoint and settings, or choose another --out")
        return
    if Path(folder).is_dir() and any(Path(folder).iterdir()):
        if resume:
            raise CheckpointError(f"cannot resume {folder}: it holds saved work but no run.json (written by an "
                                  "older prunekit), so it cannot be checked against this dense network; choose "
                                  "another --out")
        raise CheckpointError(f"{folder} already holds saved work (another run's rounds, phases or epochs); resume "
                              "it or choose another folder")
    if write:
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps({"format": RUN_FORMAT, **run}, indent=1)))
