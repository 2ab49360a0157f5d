"""Part 1: a worker killed under load."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections import Counter

import psutil
import requests

from kiln.deploy.server import Server
from kiln.loadtests.studies.reliability.load import Caller, Mix
from kiln.loadtests.studies.reliability.served import (
    Models,
    rest_payload,
    worker_pids,
)
from kiln.loadtests.studies.reliability.table import Row, failures, num, statuses_text

log = logging.getLogger("kiln.reliability")


def kill_worker(server: Server, name: str) -> int:
    """SIGKILL a READY worker of `name`; its pid. Only a process that is a TorchServe worker."""
    pid = next((p for p, status in worker_pids(server, name) if status == "READY"), None)
    if pid is None or not any(a.endswith("model_service_worker.py")
                              for a in psutil.Process(pid).cmdline()):
        raise RuntimeError(f"no READY worker process of {name} found to kill (pid {pid})")
    os.kill(pid, signal.SIGKILL)
    return pid


def wait_replacement(server: Server, name: str, killed: int, timeout: float) -> float | None:
    """Monotonic time at which a READY worker other than `killed` was first listed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(requests.RequestException):
            if any(p != killed and s == "READY" for p, s in worker_pids(server, name)):
                return time.monotonic()
        time.sleep(0.05)
    return None


# A probe request not answered within this many seconds counts as failed (status 0).
PROBE_TIMEOUT_S = 5


def recovery(calls: list[tuple[float, float, int]], kill_at: float) -> float | None:
    """Seconds from the kill to the first 200 after the last failure among requests sent after
    it (the first 200 of those, when none failed)."""
    after = [c for c in calls if c[0] >= kill_at]
    last_bad = max((i for i, c in enumerate(after) if c[2] != 200), default=-1)
    good = next((c for c in after[last_bad + 1:] if c[2] == 200), None)
    return good[1] - kill_at if good else None


def kill_part(server: Server, models: Models, opts) -> tuple[list[Row], dict]:
    victim, bystander = models.image[0], models.image[1]
    payload = rest_payload(victim)
    kill_after = opts.load_seconds / 3
    log.info("kill: wrk on %s at %d connections for %ss, SIGKILL of its worker after %.0fs; "
             "%s in a loop throughout", victim, opts.clients, opts.load_seconds, kill_after,
             bystander)
    probe = Caller(server, victim, pause=0.05, timeout=PROBE_TIMEOUT_S)
    other = Caller(server, bystander, pause=0.0)
    probe.start()
    other.start()
    load = Mix(server.url("inference"), [(f"/predictions/{victim}", payload.body,
                                          payload.content_type)],
               server.keys()["inference"], opts.clients, opts.load_seconds)
    time.sleep(kill_after)
    killed, kill_at = kill_worker(server, victim), time.monotonic()
    ready_at = wait_replacement(server, victim, killed, timeout=opts.load_seconds + 120)
    log.info("kill: worker %d of %s killed; replacement READY after %s s", killed, victim,
             num(ready_at - kill_at) if ready_at else "(none)")
    result = load.finish()
    # The probe's answers after the replacement came up: at least a second of them, and
    # until one is a 200 after the last failure (a request the dead worker held may go
    # unanswered until the probe's timeout; TorchServe does not always fail it).
    deadline = time.monotonic() + PROBE_TIMEOUT_S + 10
    time.sleep(1.0)
    while recovery(list(probe.calls), kill_at) is None and time.monotonic() < deadline:
        time.sleep(0.1)
    probe_calls, other_calls = probe.stop(), other.stop()
    lost = Counter(c[2] for c in probe_calls) + result.statuses
    other_statuses = Counter(c[2] for c in other_calls)
    worst_other = max(((a - s) * 1000 for s, a, _ in other_calls), default=None)
    back = recovery(probe_calls, kill_at)
    rows = [
        Row(f"kill: {victim} requests", sum(lost.values()) + result.socket_errors, "req",
            detail=f"wrk {result.run.requests} + probe {len(probe_calls)}"),
        Row(f"kill: {victim} failed", failures(lost) + result.socket_errors, "req",
            detail=statuses_text(lost, result.socket_errors)),
        Row("kill: until 200 again", back, "s", detail="kill -> first 200 after the last "
            "failure, among requests sent after the kill"),
        Row("kill: until replacement READY", ready_at - kill_at if ready_at else None, "s",
            detail="management API"),
        Row(f"kill: {bystander} requests", len(other_calls), "req", detail="one client, "
            "looping throughout"),
        Row(f"kill: {bystander} failed", failures(other_statuses), "req",
            detail=statuses_text(other_statuses)),
        Row(f"kill: {bystander} max latency", worst_other, "ms"),
        Row("kill: wrk CPU", result.run.client_cpu_pct, "% of a core",
            detail=f"{result.run.throughput_rps:.0f} req/s, p99 {result.run.p99_ms:.0f} ms"),
    ]
    start = load.started
    timeline = {"kill_s": kill_at - start, "ready_s": ready_at - start if ready_at else None,
                "probe": [(s - start, (a - s) * 1000, st) for s, a, st in probe_calls],
                "bystander": [(s - start, (a - s) * 1000, st) for s, a, st in other_calls]}
    return rows, timeline
