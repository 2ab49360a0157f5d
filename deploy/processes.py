"""Waiting for processes to exit, where a zombie counts as exited.

A process Kiln started detached (TorchServe's frontend, nginx's supervisor, the metrics
exporter) is not the child of the one that stops it: once it exits it stays a zombie until
init reaps it. psutil.wait_procs and kill(pid, 0) count a zombie as running, and init may be
slow to reap (measured here: 1.1 to 1.7 s per process, 4.2 s of a 7.3 s `kiln stop`) or, as a
container's PID 1 that is not an init, never reap at all.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable

import psutil

POLL_S = 0.01  # a status read is a few microseconds: the poll costs nothing, the wait little


def exited(proc: psutil.Process) -> bool:
    """Gone, replaced by another process under its pid, or a zombie (which is reaped here
    when it is this process's child)."""
    try:
        if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
            return False
    except psutil.NoSuchProcess:
        return True
    with contextlib.suppress(ChildProcessError):
        os.waitpid(proc.pid, os.WNOHANG)
    return True


def wait_exited(procs: Iterable[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Those of `procs` still running after at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    alive = list(procs)
    while True:
        alive = [p for p in alive if not exited(p)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(POLL_S)
