"""Kiln's JSON access log, kept bounded.

The front proxy writes it (deploy/nginx/nginx.conf, log format kiln_json): one line per
request, owner-only in the run folder (nginx runs under umask 077). The spans log
(deploy/proxy_spans.py) has the same lines for the requests whose trace is sampled only, and
is kept bounded the same way. nginx cannot rotate a log itself, so whoever watches nginx (the
front's supervisor under kiln serve, the entrypoint in a container) calls `Rotation.check` as
it polls: past `max_bytes` the file becomes .1 (.1 becomes .2, and so on; the oldest of
`files` is dropped) and nginx's master reopens its logs on SIGUSR1. A log then holds at most
(files + 1) x max_bytes, plus the lines written between two checks (CHECK_S apart).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

MAX_BYTES = 16 * 2**20
FILES = 3
CHECK_S = 1.0
# nginx writes the lines in buffers of this size, at most FLUSH_S late, rather than one
# write() a request (a line is written whole; SIGUSR1's reopen and nginx's exit flush them).
BUFFER = "64k"
FLUSH_S = 1


def nginx_directive(path: Path, sampled_only: bool = False) -> str:
    """nginx's line for a log of every request, or of the sampled traces' only (the spans
    log that deploy/proxy_spans.py reads; $kiln_trace_sampled is nginx.conf's)."""
    condition = " if=$kiln_trace_sampled" if sampled_only else ""
    return f"access_log {path} kiln_json buffer={BUFFER} flush={FLUSH_S}s{condition};"


def rotated(path: Path, n: int) -> Path:
    return path.with_name(f"{path.name}.{n}")


def create(path: Path) -> None:
    """An owner-only log file, unless there is one: nginx appends to it as it is."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))


def rotate(path: Path, files: int) -> None:
    """path -> path.1 -> ... -> path.`files`, the oldest dropped; a new empty path."""
    rotated(path, files).unlink(missing_ok=True)
    for n in range(files - 1, 0, -1):
        with contextlib.suppress(FileNotFoundError):
            rotated(path, n).rename(rotated(path, n + 1))
    path.rename(rotated(path, 1))
    create(path)


class Rotation:
    def __init__(self, path: Path, max_bytes: int = MAX_BYTES, files: int = FILES):
        if max_bytes < 1 or files < 1:
            raise ValueError(f"the access log needs max_bytes >= 1 and files >= 1, got "
                             f"{max_bytes} and {files}")
        self.path, self.max_bytes, self.files = path, max_bytes, files
        self.next_check = 0.0

    def check(self, nginx_master: int) -> bool:
        """Rotates when the log is over its size (at most once per CHECK_S); True if it did."""
        now = time.monotonic()
        if now < self.next_check:
            return False
        self.next_check = now + CHECK_S
        try:
            if self.path.stat().st_size <= self.max_bytes:
                return False
            rotate(self.path, self.files)
        except FileNotFoundError:  # not written yet, or gone: nginx's reopen makes it again
            return False
        os.kill(nginx_master, signal.SIGUSR1)
        return True
