"""Reliability part `front_kill`: the front proxy's nginx master killed hard under load.

kiln serve's supervisor (deploy/supervise.py) replaces a master that dies and kills the
workers it orphaned, which would otherwise answer with the keys they held. Measured: how long
until a new master, until the orphans are gone and until a request is answered again, and
what the load lost (every connection nginx held is reset when its workers are killed).
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter

import psutil

from kiln.deploy import processes
from kiln.deploy.server import Server
from kiln.loadtests.studies.reliability.kill import PROBE_TIMEOUT_S, recovery
from kiln.loadtests.studies.reliability.load import Caller, Mix
from kiln.loadtests.studies.reliability.served import Models, rest_payload
from kiln.loadtests.studies.reliability.table import Row, failures, statuses_text

WAIT_S = 30  # the longest any state below is waited for


def wait_until(condition) -> float | None:
    """Monotonic time at which `condition()` first held, None after WAIT_S."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if condition():
            return time.monotonic()
        time.sleep(0.005)
    return None


def gone(procs: list[psutil.Process]) -> bool:
    """Exited, zombies included (init may be slow to reap them)."""
    return all(map(processes.exited, procs))


def front_kill_part(server: Server, models: Models, opts) -> list[Row]:
    if server.front.pid() is None:
        return [Row("front kill: no front proxy runs", None, "")]
    victim = models.image[0]
    payload = rest_payload(victim)
    probe = Caller(server, victim, pause=0.01, timeout=PROBE_TIMEOUT_S)
    probe.start()
    load = Mix(server.url("inference"), [(f"/predictions/{victim}", payload.body,
                                          payload.content_type)],
               server.keys()["inference"], opts.clients, opts.load_seconds)
    time.sleep(opts.load_seconds / 3)
    master = server.front.pid()
    workers = psutil.Process(master).children()
    os.kill(master, signal.SIGKILL)
    killed_at = time.monotonic()
    orphans_gone_at = wait_until(lambda: gone(workers))
    master_at = wait_until(lambda: server.front.pid() not in (None, master))
    result = load.finish()
    deadline = time.monotonic() + PROBE_TIMEOUT_S + 10
    while recovery(list(probe.calls), killed_at) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    calls = probe.stop()
    lost = Counter(c[2] for c in calls) + result.statuses
    back = recovery(calls, killed_at)

    def since_kill(at: float | None) -> float | None:
        return None if at is None else (at - killed_at) * 1000

    return [
        Row(f"front kill: {victim} requests", sum(lost.values()) + result.socket_errors, "req",
            detail=f"wrk {result.run.requests} at {opts.clients} connections + probe "
                   f"{len(calls)}"),
        Row(f"front kill: {victim} failed", failures(lost) + result.socket_errors, "req",
            detail=statuses_text(lost, result.socket_errors)),
        Row("front kill: until orphaned workers gone", since_kill(orphans_gone_at), "ms",
            detail=f"{len(workers)} worker(s) of the killed master"),
        Row("front kill: until a new master", since_kill(master_at), "ms",
            detail="its pid file written: listeners bound"),
        Row("front kill: until 200 again", None if back is None else back * 1000, "ms",
            detail="kill -> first 200 after the last failure, probe sending every 10 ms"),
        Row("front kill: wrk CPU", result.run.client_cpu_pct, "% of a core",
            detail=f"{result.run.throughput_rps:.0f} req/s"),
    ]
