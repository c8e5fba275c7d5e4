"""What every CLI misuse must print: exactly one line on stderr, ``prunekit COMMAND: error: ...``."""

from __future__ import annotations


def one_error_line(capsys, command: str) -> str:
    """The single stderr line of the last ``main(...)`` call, checked for the command's error prefix."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {err!r}"
    assert lines[0].startswith(f"prunekit {command}: error: "), lines[0]
    return lines[0]
