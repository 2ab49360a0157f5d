"""Closed-loop load with h2load (Debian's `nghttp2-client`): one C process for HTTP/1.1 and
HTTP/2 alike, so that OIP over HTTP and OIP over gRPC (HTTP/2) are measured by the same client.
Each client holds one request in flight (-m 1), as wrk's connections do."""

from __future__ import annotations

import re
import resource
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from kiln.loadtests.wrk import WrkRun

NAME = "h2load (C, 1 thread, closed loop, one request in flight per client)"


class H2loadError(RuntimeError):
    pass


def available() -> bool:
    return shutil.which("h2load") is not None


def parse(output: str, log: str) -> WrkRun:
    """Figures from h2load's report and its per-request log (start us, status, duration us)."""
    finished = re.search(r"finished in ([\d.]+)s, ([\d.]+) req/s", output)
    counts = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded", output)
    if not (finished and counts):
        raise H2loadError(f"unexpected h2load output:\n{output}")
    durations = [int(line.split("\t")[2]) for line in log.splitlines() if line.strip()]
    ms = np.array(durations or [0]) / 1e3
    done, succeeded = int(counts.group(2)), int(counts.group(3))
    return WrkRun(done, float(finished.group(1)), float(finished.group(2)),
                  float(np.percentile(ms, 50)), float(np.percentile(ms, 99)), done - succeeded)


def run(url: str, body: bytes, headers: dict[str, str], clients: int, seconds: int,
        http1: bool) -> WrkRun:
    """`clients` connections POSTing `body` to `url` for `seconds`; HTTP/2 (h2c) unless
    `http1`. A gRPC error comes with HTTP status 200: check an answer before timing."""
    if not available():
        raise H2loadError("h2load is not installed: apt-get install nghttp2-client")
    with tempfile.TemporaryDirectory(prefix="kiln-h2load-") as tmp:
        data, log = Path(tmp) / "body", Path(tmp) / "log"
        data.write_bytes(body)
        cmd = ["h2load", "-t1", f"-c{clients}", "-m1", f"-D{max(1, int(seconds))}",
               "-d", str(data), "--log-file", str(log), *(["--h1"] if http1 else []),
               *(arg for name, value in headers.items() for arg in ("-H", f"{name}: {value}")),
               url]
        before, wall = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        after, wall = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter() - wall
        if done.returncode != 0:
            raise H2loadError(f"h2load failed ({done.returncode}): {done.stderr}{done.stdout}")
        result = parse(done.stdout, log.read_text() if log.exists() else "")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    result.client_cpu_pct = cpu / wall * 100
    return result
