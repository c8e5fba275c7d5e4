"""Pickle-free checkpoints: one safetensors file whose header carries the JSON metadata.

The metadata names the zoo model and its :class:`~prunekit.models.ModelConfig`, the data, the training
arguments and the metrics, so a checkpoint rebuilds its network without any pickled module. Writes are atomic
(temporary file + ``os.replace``): an interrupted write never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

FORMAT = "prunekit.checkpoint/2"
# what this version reads: /1 files (prunekit 0.1) describe their weight encoding in method-specific fields, which
# prunekit.persistence.metadata reads into today's ``encoding``
READABLE_FORMATS = ("prunekit.checkpoint/1", FORMAT)
_META_KEY = "prunekit"


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupted, or does not fit the model it is loaded into."""


TEMP_MARK = "prunekit-"  # in every temporary's name, so a clean-up never touches another program's files
TEMP_PATTERN = f".*.{TEMP_MARK}*.tmp*"


def atomic_write(path: str | Path, write) -> None:
    """Call ``write(tmp_path)`` then move the temporary file over ``path`` in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the temporary keeps the real extension last: some writers (torch.export) check it
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{TEMP_MARK}", suffix=".tmp" + path.suffix)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_folder(folder: str | Path, write, keep_existing: bool = False) -> Path:
    """Call ``write(tmp_folder)`` on a new folder beside ``folder``, then put it in ``folder``'s place (an
    existing ``folder`` is removed only once the new one is complete).

    With ``keep_existing``, a ``folder`` that appeared meanwhile (another process filling the same cache) is kept
    and the new copy discarded, so a reader of the first copy never sees it deleted.
    """
    import shutil

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.{TEMP_MARK}"))
    try:
        write(tmp)
        if keep_existing:
            try:
                os.rename(tmp, folder)  # fails when folder exists and is not empty: another process won
            except OSError:
                if not folder.is_dir():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
            return folder
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def state_fingerprint(model: nn.Module | dict[str, torch.Tensor]) -> str:
    """SHA-256 of a network's tensors (names, dtypes, shapes and bytes, in name order), as 64 hex digits.

    Two networks share a fingerprint exactly when their state_dicts are equal, whatever file they came from; a
    pruning run records its dense network's fingerprint so that ``--resume`` can refuse a different one.
    """
    state = model.state_dict() if isinstance(model, nn.Module) else model
    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def save_checkpoint(path: str | Path, model: nn.Module, metadata: dict[str, Any]) -> Path:
    """Save ``model``'s state_dict and JSON-serialisable ``metadata`` atomically to ``path`` (.safetensors)."""
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    header = {_META_KEY: json.dumps({"format": FORMAT, **metadata}, sort_keys=True)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))
    return path


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON metadata of a checkpoint, without loading its tensors."""
    path = _existing(path)
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint ({exc})") from None
    if _META_KEY not in header:
        raise CheckpointError(f"{path} is a safetensors file without prunekit metadata; was it saved by prunekit?")
    try:
        meta = json.loads(header[_META_KEY])
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: corrupted metadata ({exc})") from None
    from prunekit.persistence.metadata import validate_metadata

    if isinstance(meta, dict) and meta.get("format") not in READABLE_FORMATS:
        raise CheckpointError(f"{path}: unsupported checkpoint format {meta.get('format')!r}; this prunekit reads "
                              f"{', '.join(map(repr, READABLE_FORMATS))}")
    return validate_metadata(meta, str(path))


def read_metadata_if_any(path: str | Path) -> dict[str, Any]:
    """The validated metadata of a prunekit ``.safetensors`` checkpoint; ``{}`` for a plain state_dict file (a
    ``.pt`` file, or safetensors saved by another tool).

    Raises:
        CheckpointError: as :func:`read_metadata`, except for a missing prunekit header.
    """
    if not str(path).endswith(".safetensors"):
        return {}
    try:
        return read_metadata(path)
    except CheckpointError as exc:
        if "without prunekit metadata" in str(exc):
            return {}
        raise


def load_state(path: str | Path) -> dict[str, torch.Tensor]:
    path = _existing(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is corrupted or not a safetensors file ({exc})") from None


def check_state_fits(model: nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> None:
    """Refuse tensors that do not fit ``model``: missing, unexpected, other shapes, or integer where the model
    holds floating point (and the reverse); ``source`` names them in the message.

    Raises:
        CheckpointError: listing the mismatches.
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    kinds = sorted(k for k in set(state) & set(expected)
                   if state[k].is_floating_point() != expected[k].is_floating_point())
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {_preview(missing)}")
        if unexpected:
            parts.append(f"unexpected {_preview(unexpected)}")
        if wrong:
            k = wrong[0]
            parts.append(f"shape mismatch for {k}: checkpoint {tuple(state[k].shape)} vs model "
                         f"{tuple(expected[k].shape)} ({len(wrong)} tensors in all)")
        raise CheckpointError(f"{source} does not fit this model: {'; '.join(parts)}")
    if kinds:
        k = kinds[0]
        need = "floating-point" if expected[k].is_floating_point() else str(expected[k].dtype)
        raise CheckpointError(f"{source} holds {k} as {state[k].dtype}, but the model needs {need} values "
                              f"({len(kinds)} tensors in all); prunekit does not cast between integer and "
                              "floating-point weights")


def load_weights_(model: nn.Module, path: str | Path) -> None:
    """Load a checkpoint's tensors into ``model`` in place, with an error that lists mismatches."""
    state = load_state(path)
    check_state_fits(model, state, path)
    model.load_state_dict(state)


def load_model(path: str | Path, trusted_factories: Collection[str] = ()) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the network a checkpoint describes (dense or compressed) and load its weights: the one loader,
    :func:`prunekit.persistence.architecture.load_compressed`. Returns (model in eval mode, metadata)."""
    from prunekit.persistence.architecture import load_compressed

    return load_compressed(path, trusted_factories)


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    return path


def _preview(names: list[str], n: int = 3) -> str:
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more
