"""What a TorchServe frontend killed hard leaves running: its workers, which hold memory and
the model. Each was started with a socket path in the frontend's run folder."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import psutil

from kiln.deploy import processes

WORKER_SCRIPT = "model_service_worker.py"


def orphan_workers(run_dir: Path, frontend: int | None) -> list[psutil.Process]:
    """Workers of `run_dir` whose parent is not `frontend` (its running frontend, if any)."""
    sockets = str(run_dir / "tmp") + os.sep
    orphans = []
    for proc in psutil.process_iter(["cmdline", "ppid"]):
        cmdline = proc.info["cmdline"] or []
        if not any(a.endswith(WORKER_SCRIPT) for a in cmdline):
            continue
        if any(a.startswith(sockets) for a in cmdline) and proc.info["ppid"] != frontend:
            orphans.append(proc)
    return orphans


def end(procs: list[psutil.Process], timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL for those still running after `timeout`."""
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    for proc in processes.wait_exited(procs, timeout):
        with contextlib.suppress(psutil.Error):
            proc.kill()
