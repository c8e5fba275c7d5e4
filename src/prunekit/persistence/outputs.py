"""Output folders and files that no command can destroy or mix: one writer per folder, no write over an input.

:func:`output_lock` holds an exclusive ``flock`` on the output folder itself for a whole run, so a second run into
the same folder stops at once with one line, and the lock vanishes with the process (a ``kill -9`` leaves no stale
lock behind). While it holds the lock it also deletes the temporary files that a killed write left there.
:func:`check_output_files` refuses output paths that are empty, that name an input, that repeat each other or that
would replace an existing file without ``overwrite``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from prunekit.persistence.checkpoint import TEMP_PATTERN

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory directory locks
    fcntl = None


class OutputBusyError(RuntimeError):
    """Another prunekit run is writing into the same output folder."""


def output_dir(path: str | Path | None, flag: str = "--out") -> Path:
    """``path`` as a folder to write into, refusing an empty name or an existing file.

    Raises:
        ValueError: ``path`` is empty (which would mean the current folder) or names a file.
    """
    if path is None or not str(path).strip():
        raise ValueError(f"{flag} must name a folder, got {'nothing' if path is None else repr(str(path))}; "
                         "pass e.g. --out runs/lenet5")
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{flag} {out} is a file, not a folder; choose a folder to write into")
    return out


@contextlib.contextmanager
def output_lock(path: str | Path, flag: str = "--out") -> Iterator[Path]:
    """Create the folder ``path`` and hold an exclusive lock on it until the block ends; a folder this call
    created is removed again if the block leaves it empty.

    Raises:
        ValueError: see :func:`output_dir`.
        OutputBusyError: another process holds the lock.
    """
    out = output_dir(path, flag)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out, os.O_RDONLY) if fcntl is not None else None
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                created = False
                raise OutputBusyError(f"{out} is being written by another prunekit run; wait for it to finish or "
                                      f"choose another {flag}") from None
        remove_stale_temporaries(out)
        yield out
    finally:
        if created and not any(out.iterdir()):
            out.rmdir()  # a run that failed before writing anything leaves no empty folder behind
        if fd is not None:
            os.close(fd)  # closing the descriptor releases the lock


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Delete the temporaries that :func:`~prunekit.persistence.checkpoint.atomic_write` leaves when a process is killed
    mid-write (``.NAME.prunekit-XXXX.tmp.EXT``), in ``directory`` and its sub-folders.

    Call it only while holding ``directory``'s lock: a sub-folder locked by another running job is skipped with
    everything below it, so its in-flight temporaries survive. Returns the files removed.
    """
    root = Path(directory)
    removed: list[Path] = []
    for here, subdirs, _files in os.walk(root):
        subdirs[:] = [d for d in subdirs if not _locked_by_another(Path(here) / d)]
        for path in Path(here).glob(TEMP_PATTERN):
            if path.is_file():
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def _locked_by_another(folder: Path) -> bool:
    if fcntl is None:  # pragma: no cover
        return False
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return True  # unreadable: leave it alone
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def check_output_files(outputs: dict[str, str | Path | None], inputs: Iterable[str | Path] = (), *,
                       overwrite: bool = False) -> dict[str, Path]:
    """Validate the files a command is about to write.

    Args:
        outputs: Flag -> path (``None`` entries are skipped), e.g. ``{"--onnx": "m.onnx"}``.
        inputs: Files the command reads; no output may be one of them, whatever ``overwrite`` says.
        overwrite: Allow replacing existing files that are not inputs.

    Returns:
        Flag -> path of the outputs that were given.

    Raises:
        ValueError: an empty path, a folder, an input, two outputs on one path, or an existing file without
            ``overwrite``.
    """
    given = {flag: Path(p) for flag, p in outputs.items() if p is not None}
    read = [Path(p) for p in inputs]
    seen: dict[Path, str] = {}
    for flag, path in given.items():
        if not str(path).strip() or str(path) in (".", ""):
            raise ValueError(f"{flag} must name a file, got {str(path)!r}")
        if path.is_dir():
            raise ValueError(f"{flag} {path} is a folder; give a file path")
        for source in read:
            if _same_file(path, source):
                raise ValueError(f"{flag} {path} is the input file {source}; prunekit never writes over its input, "
                                 "choose another path")
        key = path.resolve()
        if key in seen:
            raise ValueError(f"{seen[key]} and {flag} both name {path}; give each output its own path")
        seen[key] = flag
        if path.exists() and not overwrite:
            raise ValueError(f"{flag} {path} already exists; pass --overwrite to replace it or choose another path")
        if path.exists() and path.name in ("run.json", "recipe.yaml", "train_state.pt"):
            raise ValueError(f"{flag} {path} is a run's own record; prunekit never replaces it, choose another path")
    return given


def _same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def refuse_existing_run(out: Path, patterns: Iterable[str], what: str, resumable: bool = True) -> None:
    """Refuse to start a fresh run in a folder that already holds one (files matching ``patterns``).

    Raises:
        ValueError: naming the folder, the file found and the way out (``--resume`` or another ``--out``).
    """
    for pattern in patterns:
        found = sorted(out.glob(pattern))
        if found:
            how = "pass --resume to continue it or choose" if resumable else "choose"
            raise ValueError(f"{out} already holds {what}; {how} another --out (found {found[0].relative_to(out)})")


def locked_output(what: str, existing: tuple[str, ...], param: str = "out", resumable: bool = True):
    """Decorate a job whose keyword ``param`` is its output folder: the whole call holds :func:`output_lock`, and
    without ``resume=True`` a folder already holding ``existing`` files is refused (:func:`refuse_existing_run`)."""

    def decorate(job):
        signature = inspect.signature(job)

        @functools.wraps(job)
        def run(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            out = bound.arguments[param]
            if out is None:
                return job(*args, **kwargs)
            with output_lock(out) as folder:
                if not bound.arguments.get("resume", False):
                    refuse_existing_run(folder, existing, what, resumable)
                return job(*args, **kwargs)

        return run

    return decorate
