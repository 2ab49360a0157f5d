"""Files and folders that only their owner may read: a run folder holds keys and tokens."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from kiln.keys import private_dir


@contextlib.contextmanager
def owner_only_files():
    """umask 077 inside the block: what this process and the processes it starts create is
    readable by its owner only."""
    mask = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(mask)


def owner_only(folder: Path) -> None:
    """`folder` and everything in it readable by its owner only (what an earlier run, or an
    earlier Kiln, left readable by others included)."""
    private_dir(folder)
    for root, dirs, files in os.walk(folder):
        for name in (*dirs, *files):
            path = Path(root, name)
            with contextlib.suppress(OSError):
                mode = path.lstat().st_mode
                if mode & 0o077 and not path.is_symlink():
                    path.chmod(mode & 0o700)
