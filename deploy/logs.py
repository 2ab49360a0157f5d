"""The end of a log file, for error messages about the processes Kiln starts."""

from __future__ import annotations

from pathlib import Path


def tail(path: Path, lines: int, missing: str) -> str:
    """The last `lines` lines of `path`, or `missing` where it cannot be read."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return missing
