"""Closed-loop HTTP load with wrk (Debian's `wrk`): one C process, an epoll loop, a few
percent of a core where a Python client would need several, so the server gets the CPU."""

from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent / "wrk_post.lua"
UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
NAME = "wrk (C, epoll, 1 thread, closed loop)"


class WrkError(RuntimeError):
    pass


@dataclass
class WrkRun:
    requests: int
    seconds: float
    throughput_rps: float
    p50_ms: float
    p99_ms: float
    errors: int  # non-2xx answers plus socket errors
    client_cpu_pct: float = 0.0


def _ms(value: str, unit: str) -> float:
    return float(value) * UNITS[unit]


def parse(output: str) -> WrkRun:
    """Figures from wrk's report (run with --latency for the percentiles)."""
    done = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m|h),", output)
    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    pct = dict(re.findall(r"^\s+(\d+)%\s+([\d.]+(?:us|ms|s|m|h))\s*$", output, re.M))
    if not (done and rate and "50" in pct and "99" in pct):
        raise WrkError(f"unexpected wrk output (was it run with --latency?):\n{output}")
    p50, p99 = (re.fullmatch(r"([\d.]+)(\w+)", pct[k]).groups() for k in ("50", "99"))
    errors = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", output))
    socket = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                       output)
    errors += sum(int(n) for n in socket.groups()) if socket else 0
    return WrkRun(int(done.group(1)), _ms(done.group(2), done.group(3)) / 1e3,
                  float(rate.group(1)), _ms(*p50), _ms(*p99), errors)


def available() -> bool:
    return shutil.which("wrk") is not None


def run(url: str, body: bytes, content_type: str, token: str, clients: int,
        seconds: int) -> WrkRun:
    """`clients` connections, each sending the next request when the last is answered."""
    if not available():
        raise WrkError("wrk is not installed: apt-get install wrk")
    with tempfile.NamedTemporaryFile(prefix="kiln-wrk-", suffix=".body") as f:
        f.write(body)
        f.flush()
        env = dict(os.environ, KILN_WRK_BODY=f.name, KILN_WRK_CONTENT_TYPE=content_type,
                   KILN_WRK_TOKEN=token)
        cmd = ["wrk", "-t1", f"-c{clients}", f"-d{max(1, int(seconds))}s", "--latency",
               "--timeout", "30s", "-s", str(SCRIPT), url]
        before, wall = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        after, wall = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter() - wall
    if done.returncode != 0:
        raise WrkError(f"wrk failed ({done.returncode}): {done.stderr}{done.stdout}")
    result = parse(done.stdout)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    result.client_cpu_pct = cpu / wall * 100
    return result
