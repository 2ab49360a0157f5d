"""Reliability, in one run and one table: `python -m kiln.loadtests.reliability`.

Seven parts, against Kiln's default set served as `kiln serve` serves it (front proxy and
TorchServe on free loopback ports), started for the purpose, or the server `kiln serve` runs
from --run-dir; every request goes through server.url() with server.keys():

1. kill: wrk loads the first image model while one of its workers is SIGKILLed; failed
   requests by status, the time until a request sent after the kill is answered 200 again
   (a probe client beside wrk), the time until the management API lists a READY replacement,
   and what a client of the second image model, looping throughout, saw meanwhile.
2. slow: N connections that trickle their headers at one byte a second (slowloris), held on
   the REST and the Open Inference Protocol port while good clients call that port: p50, p99,
   throughput and failed requests with them held, beside the same without them.
3. amplification: the time of the costliest requests the handlers accept (the most images
   at the request pixel bound, one image at it, the most JSON pixel arrays, the most feature
   rows) beside a minimal request, and the time to refuse one just over each bound.
4. soak: --soak-seconds of steady mixed load (every served model, REST and OIP) while the
   RSS and PSS of the frontend and of each model's workers are sampled: start, end, max and
   the slope in MB per 100k requests.
5. thin: the time to answer or refuse the costliest images of any shape, and good requests of
   the first image model while clients send one in a loop (loadtests/thin_images.py).
6. oip_flood: --clients clients for --load-seconds sending the first image model the largest
   binary OIP requests it takes and refuses (loadtests/oip_flood.py): answers by status, the
   frontend's RSS before, at its peak and after, and workers replaced.
7. front_kill: wrk on the first image model for --load-seconds while the front proxy's nginx
   master is killed hard a third of the way in: until its orphaned workers are gone, until a
   new master, until a 200 again, and what the load lost (loadtests/front_kill.py).

The load generator (wrk; in part 2 Python clients, which account for every request sent) shares
the cores with the server: its CPU is in the table.
No model is named here; they are picked from what the server serves by the kind of input.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import html
import io
import json
import logging
import math
import os
import re
import select
import signal
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from http.client import HTTPConnection
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import psutil
import requests
from PIL import Image, ImageDraw

from kiln import client as http
from kiln import declaration
from kiln.console import setup_logging
from kiln.deploy.server import INTERNAL_PORTS_FILE, Ports, Server, ServerSettings
from kiln.handlers import images, inputs
from kiln.loadtests import declared, oip_flood, payloads, svg, wrk
from kiln.loadtests.monitor import Sampler
from kiln.model_store import STORE

log = logging.getLogger("kiln.reliability")
PARTS = ("kill", "slow", "amplification", "soak", "thin", "oip_flood", "front_kill")
# A good request unanswered this long while slow connections are held counts as failed: far
# above its p99 on an idle server, far below TorchServe's own response timeout (minutes).
GOOD_TIMEOUT_S = 2
MB = 1024 * 1024


class SetupError(RuntimeError):
    """The server cannot be measured as it is: what it serves, or none runs."""

# POSTs the requests listed in KILN_MIX in turn (one a line: path, content type and body file,
# tab-separated) and counts the answers by status, which wrk's own report lumps together.
MIX_LUA = r"""
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  statuses, mix, turn = {}, {}, 0
  local token = os.getenv("KILN_WRK_TOKEN")
  for line in io.lines(os.getenv("KILN_MIX")) do
    local path, ctype, file = line:match("^([^\t]*)\t([^\t]*)\t(.*)$")
    local f = assert(io.open(file, "rb"))
    local headers = {["Content-Type"] = ctype, ["Authorization"] = "Bearer " .. token}
    table.insert(mix, wrk.format("POST", path, headers, f:read("*a")))
    f:close()
  end
end

function request()
  turn = turn % #mix + 1
  return mix[turn]
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  for _, thread in ipairs(threads) do
    for status, count in pairs(thread:get("statuses")) do
      io.write(string.format("kiln-status %d %d\n", status, count))
    end
  end
end
"""


# --- the table -----------------------------------------------------------------------------
@dataclass
class Row:
    name: str
    value: float | None  # None: not measured (printed as "-")
    unit: str
    base: float | None = None  # what `value` is set beside: the same without the stress
    detail: str = ""

    @property
    def ratio(self) -> float | None:
        if self.value is None or not self.base:
            return None
        return float(f"{self.value / self.base:.3g}")


def _num(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if float(value).is_integer() or abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}" if abs(value) >= 5e-4 else "0"


def format_table(rows: list[Row]) -> str:
    width = max([len("row"), *(len(r.name) for r in rows)]) + 2
    lines = [f"{'row':<{width}}{'value':>10}  {'unit':<12}{'base':>10}{'x base':>8}  detail"]
    for r in rows:
        lines.append(f"{r.name:<{width}}{_num(r.value):>10}  {r.unit:<12}{_num(r.base):>10}"
                     f"{_num(r.ratio):>8}  {r.detail}".rstrip())
    return "\n".join(lines)


def statuses_text(statuses: Counter, socket_errors: int = 0) -> str:
    parts = [f"{s} x{c}" if s else f"no answer x{c}"
             for s, c in sorted(statuses.items()) if s != 200]
    if socket_errors:
        parts.append(f"socket errors x{socket_errors}")
    return ", ".join(parts) or "none"


def failures(statuses: Counter) -> int:
    return sum(c for s, c in statuses.items() if s != 200)


# --- what is served ------------------------------------------------------------------------
@dataclass(frozen=True)
class Models:
    """The served models the parts use, by the kind of their one input (management order)."""

    served: list[str]
    image: list[str]
    features: list[str]

    @classmethod
    def of(cls, server: Server) -> Models:
        r = requests.get(f"{server.url('management')}/models", timeout=10,
                         headers={"Authorization": f"Bearer {server.keys()['management']}"})
        r.raise_for_status()
        served = [m["modelName"] for m in r.json()["models"]]
        kinds = {}
        for name in served:
            with contextlib.suppress(declaration.DeclarationError):
                kinds[name] = declared.input_kind(declaration.get(name))
        models = cls(served, [m for m in served if kinds.get(m) == "image"],
                     [m for m in served if kinds.get(m) == "features"])
        if len(models.image) < 2 or not models.features:
            raise SetupError(f"the server serves {', '.join(served) or 'nothing'}: these parts "
                             "need two image models and a features model (Kiln's default set)")
        return models


def rest_payload(name: str) -> payloads.Payload:
    return payloads.first_payload(declaration.get(name))


def oip_payload(name: str) -> payloads.Payload | None:
    found = payloads.oip_payloads(declaration.get(name))
    return found[0] if found else None


def worker_pids(server: Server, name: str) -> list[tuple[int, str]]:
    """(pid, status) of each worker the management API lists for `name`."""
    return [(int(w.get("pid", -1)), w.get("status", "")) for w in server.model_status(name)]


# --- load ----------------------------------------------------------------------------------
@dataclass
class Load:
    run: wrk.WrkRun
    statuses: Counter

    @property
    def socket_errors(self) -> int:
        non_2xx_3xx = sum(c for s, c in self.statuses.items() if not 200 <= s < 400)
        return self.run.errors - non_2xx_3xx

    @property
    def failed(self) -> int:
        return failures(self.statuses) + self.socket_errors


class Mix:
    """wrk POSTing `calls` (path, body, content type) in turn at `clients` connections for
    `seconds`, in the background from construction until finish()."""

    def __init__(self, base_url: str, calls: list[tuple[str, bytes, str]], token: str,
                 clients: int, seconds: float):
        self._folder = tempfile.TemporaryDirectory(prefix="kiln-reliability-")
        folder = Path(self._folder.name)
        lines = []
        for i, (path, body, content_type) in enumerate(calls):
            (folder / f"body{i}").write_bytes(body)
            lines.append(f"{path}\t{content_type}\t{folder / f'body{i}'}")
        (folder / "mix.txt").write_text("\n".join(lines) + "\n")
        (folder / "mix.lua").write_text(MIX_LUA)
        env = dict(os.environ, KILN_MIX=str(folder / "mix.txt"), KILN_WRK_TOKEN=token)
        cmd = ["wrk", "-t1", f"-c{clients}", f"-d{max(1, round(seconds))}s", "--latency",
               "--timeout", "30s", "-s", str(folder / "mix.lua"), base_url]
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def finish(self) -> Load:
        try:
            out = self.proc.stdout.read()
            # wait4, not wait: this wrk's own CPU, whatever else runs beside it.
            _, status, usage = os.wait4(self.proc.pid, 0)
            self.proc.returncode = os.waitstatus_to_exitcode(status)
        finally:
            self.proc.stdout.close()
            self._folder.cleanup()
        if self.proc.returncode != 0:
            raise wrk.WrkError(f"wrk failed ({self.proc.returncode}): {out}")
        run = wrk.parse(out)
        run.client_cpu_pct = ((usage.ru_utime + usage.ru_stime)
                              / (time.monotonic() - self.started) * 100)
        statuses = Counter()
        for status, count in re.findall(r"^kiln-status (\d+) (\d+)$", out, re.M):
            statuses[int(status)] += int(count)
        return Load(run, statuses)


class Caller(threading.Thread):
    """One keep-alive client sending the same request in a loop, `pause` seconds apart, until
    stop(); `calls` holds (sent, answered, status) in monotonic seconds (status 0: none)."""

    def __init__(self, server: Server, name: str, pause: float, timeout: float = 30):
        super().__init__(daemon=True)
        self.client = http.Client(server.url("inference"), server.keys()["inference"],
                                  timeout=timeout)
        self.model, self.payload, self.pause = name, rest_payload(name), pause
        self.calls: list[tuple[float, float, int]] = []
        self._halt = threading.Event()

    def run(self):
        while not self._halt.is_set():
            sent = time.monotonic()
            try:
                status = self.client.predict(self.model, self.payload.body,
                                             self.payload.content_type).status
            except requests.RequestException:
                status = 0
            self.calls.append((sent, time.monotonic(), status))
            self._halt.wait(self.pause)

    def stop(self) -> list[tuple[float, float, int]]:
        self._halt.set()
        self.join(timeout=60)
        return self.calls


# --- 1. a worker killed under load ---------------------------------------------------------
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
             _num(ready_at - kill_at) if ready_at else "(none)")
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


# --- 2. slow clients -----------------------------------------------------------------------
class SlowClients:
    """`n` connections that send a request line, then one header byte a second, and never end
    their headers. held(): how many the server has neither closed nor answered."""

    def __init__(self, base_url: str, path: str, n: int):
        self.address = urlsplit(base_url)
        self.path, self.n = path, n
        self.sockets: list[socket.socket] = []
        self.refused = 0
        self.dropped: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._trickle, daemon=True)

    def __enter__(self) -> SlowClients:
        head = (f"POST {self.path} HTTP/1.1\r\nHost: {self.address.netloc}\r\n"
                "Content-Type: application/json\r\nX-Slow: ").encode()
        for _ in range(self.n):
            try:
                s = socket.create_connection((self.address.hostname, self.address.port), 5)
                s.sendall(head)
                self.sockets.append(s)
            except OSError:
                self.refused += 1
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        for s in self.sockets:
            s.close()

    def _trickle(self):
        poller = select.poll()
        for s in self.sockets:
            poller.register(s, select.POLLIN)
        while not self._stop.wait(1.0):
            # Readable: the server answered (an error, a timeout) or closed the connection.
            for fd, _ in poller.poll(0):
                self.dropped.add(fd)
                poller.unregister(fd)
            for s in self.sockets:
                if s.fileno() in self.dropped:
                    continue
                try:
                    s.send(b"a")
                except OSError:
                    self.dropped.add(s.fileno())
                    poller.unregister(s)

    def held(self) -> int:
        return len(self.sockets) - len(self.dropped)


@dataclass
class Good:
    """What the good clients of one cell got: ms of each 200, the rest by status."""

    ms: list[float]
    failed: Counter  # by status; 0: no answer within GOOD_TIMEOUT_S, or the connection broke
    seconds: float
    client_cpu_pct: float  # this process's, the slow connections' trickle included

    def percentile(self, q: float) -> float | None:
        return float(np.percentile(self.ms, q)) if self.ms else None


def good_requests(base_url: str, path: str, payload: payloads.Payload, token: str,
                  clients: int, seconds: float) -> Good:
    """`clients` keep-alive connections, each sending the next request when the last was
    answered or timed out; every request sent is accounted for, which wrk cannot say when a
    server stops answering. Python, but the same client with and without slow connections."""
    address = urlsplit(base_url)
    headers = {"Content-Type": payload.content_type, "Authorization": f"Bearer {token}"}
    ms, failed, lock = [], Counter(), threading.Lock()
    stop_at = time.monotonic() + seconds

    def client():
        conn = None
        while time.monotonic() < stop_at:
            conn = conn or HTTPConnection(address.hostname, address.port,
                                          timeout=GOOD_TIMEOUT_S)
            start = time.perf_counter()
            try:
                conn.request("POST", path, body=payload.body, headers=headers)
                answer = conn.getresponse()
                answer.read()
                status = answer.status
            except OSError:
                status, conn = 0, conn.close()
            with lock:
                if status == 200:
                    ms.append((time.perf_counter() - start) * 1000)
                else:
                    failed[status] += 1
        if conn:
            conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started, cpu = time.monotonic(), time.process_time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - started
    return Good(ms, failed, wall, (time.process_time() - cpu) / wall * 100)


def slow_rows(proto: str, n: int, good: Good, base: Good | None,
              slow: SlowClients | None) -> list[Row]:
    """p50, p99, throughput and failures of good requests with `n` slow connections held."""
    held = f"{n} held" if slow else "none held"
    detail = f"{slow.held()}/{n} slow held to the end" if slow else ""
    if slow and slow.refused:
        detail += f", {slow.refused} refused"
    sent = len(good.ms) + sum(good.failed.values())
    return [Row(f"slow {proto}: p50, {held}", good.percentile(50), "ms",
                base and base.percentile(50), detail),
            Row(f"slow {proto}: p99, {held}", good.percentile(99), "ms",
                base and base.percentile(99)),
            Row(f"slow {proto}: req/s, {held}", len(good.ms) / good.seconds, "req/s",
                base and len(base.ms) / base.seconds,
                f"client CPU {good.client_cpu_pct:.0f}% of a core"),
            Row(f"slow {proto}: good failed, {held}", sum(good.failed.values()), "req",
                base and sum(base.failed.values()),
                f"of {sent}; {statuses_text(good.failed)}")]


def slow_part(server: Server, models: Models, opts) -> list[Row]:
    name = models.image[0]
    token = server.keys()["inference"]
    targets = {"rest": (server.url("inference"), f"/predictions/{name}", rest_payload(name)),
               "oip": (server.url("oip"), f"/v2/models/{name}/infer", oip_payload(name))}
    rows = []
    for proto, (base_url, path, payload) in targets.items():
        good = functools.partial(good_requests, base_url, path, payload, token, opts.clients,
                                 opts.cell_seconds)
        log.info("slow %s: %s, %d good clients for %ss, no slow connection held", proto,
                 name, opts.clients, opts.cell_seconds)
        base = good()
        rows += slow_rows(proto, 0, base, None, None)
        for n in opts.slow:
            log.info("slow %s: the same with %d slow connections held", proto, n)
            with SlowClients(base_url, path, n) as slow:
                time.sleep(1.0)  # accepted and trickling before the good requests start
                rows += slow_rows(proto, n, good(), base, slow)
    return rows


# --- 3. amplification ----------------------------------------------------------------------
@dataclass(frozen=True)
class Bounds:
    instances: int
    request_pixels: int
    image_pixels: int
    body_bytes: int
    # What the handlers charge an image per row and per column, beside its pixels.
    row_pixels: int = 0
    column_pixels: int = 0
    # Seconds to wait a second of costly decoding back (limits.DecodeShare).
    rest_per_s: float = 0

    @classmethod
    def served(cls, server: Server) -> Bounds:
        """The handlers' per-request bounds (from handlers/limits.py where it defines them),
        and the frontend's body bound."""
        try:
            from kiln.handlers import limits
        except ImportError:
            limits = None
        return cls(getattr(limits, "MAX_INSTANCES", inputs.MAX_INSTANCES),
                   getattr(limits, "MAX_REQUEST_PIXELS", images.MAX_REQUEST_PIXELS),
                   getattr(limits, "MAX_IMAGE_PIXELS", images.MAX_IMAGE_PIXELS),
                   server.settings.max_request_size, getattr(limits, "ROW_PIXELS", 0),
                   getattr(limits, "COLUMN_PIXELS", 0),
                   1 / getattr(limits, "COSTLY_SHARE", math.inf))


def ring_png(width: int, height: int, channels: int) -> bytes:
    """A thick dark ring on white, edge to edge: the MNIST framing crops and scales all of it
    (the costliest case), and it compresses to a small body."""
    img = Image.new("L" if channels == 1 else "RGB", (width, height), "white")
    ImageDraw.Draw(img).ellipse((0, 0, width - 1, height - 1), outline="black",
                                width=max(1, min(width, height) // 8))
    buffer = io.BytesIO()
    img.save(buffer, "PNG")
    return buffer.getvalue()


def image_requests(spec: dict, b: Bounds) -> dict[str, tuple[bytes, str, str]]:
    """label -> (body, content type, what it is) for the costliest image requests, and the
    one just over the request pixel bound."""
    n = b.instances
    side = math.isqrt(min(b.request_pixels // n, b.image_pixels))
    row, column = b.row_pixels, b.column_pixels
    while n * (side * side + (row + column) * side) > b.request_pixels:
        side -= 1
    one = math.isqrt(min(b.request_pixels, b.image_pixels))
    tile = ring_png(side, side, spec["channels"])
    # rows that cross the bound
    extra = (b.request_pixels - n * (side * side + (row + column) * side)) // (side + row) + 1
    over = [tile] * (n - 1) + [ring_png(side, side + extra, spec["channels"])]
    rng = np.random.default_rng(0)
    shape = tuple(images.pixel_shape(spec))
    arrays = rng.integers(0, int(spec["pixel_max"]) + 1, size=(n, *shape)).tolist()
    return {
        "most PNGs at pixel bound": (*http.encode_images([tile] * n),
                                     f"{n} x {side}x{side} = {n * side * side:,} px"),
        "one PNG at pixel bound": (ring_png(one, one, spec["channels"]), "image/png",
                                   f"{one}x{one} = {one * one:,} px"),
        "most JSON pixel arrays": (*http.encode_json({"instances": arrays}),
                                   f"{n} x {'x'.join(map(str, shape))}"),
        "pixels over bound, refused": (*http.encode_images(over),
                                       f"{n * side * side + extra * side:,} px "
                                       f"(bound {b.request_pixels:,})"),
    }


def feature_requests(example, b: Bounds) -> dict[str, tuple[bytes, str, str]]:
    return {"most rows": (*http.encode_json([example] * b.instances), f"{b.instances} rows"),
            "rows over bound, refused": (*http.encode_json([example] * (b.instances + 1)),
                                         f"{b.instances + 1} rows (bound {b.instances})")}


def timed(client: http.Client, name: str, body: bytes, content_type: str,
          repeat: int, rest_per_s: float = 0) -> tuple[float, Counter]:
    """Median ms of `repeat` calls, and their statuses (0: the connection was closed), each
    followed by a pause `rest_per_s` times as long as it took: a worker gives costly images a
    share of its time (Bounds.rest_per_s), and each call, here or in the next case, is to be
    timed, not refused for the one before it."""
    times, statuses = [], Counter()
    for _ in range(repeat):
        start = time.perf_counter()
        try:
            statuses[client.predict(name, body, content_type).status] += 1
        except requests.RequestException:
            statuses[0] += 1
            client.session = requests.Session()
        times.append((time.perf_counter() - start) * 1000)
        time.sleep(times[-1] / 1000 * rest_per_s)
    return statistics.median(times), statuses


def amplification_part(server: Server, models: Models, opts) -> list[Row]:
    bounds = Bounds.served(server)
    client = http.Client(server.url("inference"), server.keys()["inference"], timeout=300)
    image, features = models.image[0], models.features[0]
    minimal_image, minimal_rows = rest_payload(image), rest_payload(features)
    cases = {image: image_requests(declaration.get(image).inputs[0], bounds),
             features: feature_requests(json.loads(minimal_rows.body), bounds)}
    padding = bounds.body_bytes + 1 - len(minimal_image.body)
    cases[image]["body over size bound, refused"] = (
        minimal_image.body + b" " * padding, minimal_image.content_type,
        f"{bounds.body_bytes + 1:,} bytes (bound {bounds.body_bytes:,})")
    rows = []
    for name, minimal in ((image, minimal_image), (features, minimal_rows)):
        log.info("amplification: %s, %d call(s) of each request", name, opts.repeat)
        least, statuses = timed(client, name, minimal.body, minimal.content_type, opts.repeat)
        rows.append(Row(f"amp {name}: minimal", least, "ms",
                        detail=f"{len(minimal.body):,} bytes, {_codes(statuses)}"))
        rest_per_s = bounds.rest_per_s if name == image else 0
        for label, (body, content_type, what) in cases[name].items():
            ms, statuses = timed(client, name, body, content_type, opts.repeat, rest_per_s)
            rows.append(Row(f"amp {name}: {label}", ms, "ms", least,
                            f"{what}, {len(body) / MB:.2f} MB, {_codes(statuses)}"))
    return rows


def _codes(statuses: Counter) -> str:
    return ", ".join(f"{s or 'closed'} x{c}" for s, c in sorted(statuses.items()))


# --- 4. soak -------------------------------------------------------------------------------
def pss_mb(pid: int) -> float | None:
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    found = re.search(r"^Pss:\s+(\d+) kB", text, re.M)
    return int(found[1]) / 1024 if found else None


@dataclass
class MemorySampler(Sampler):
    """RSS and PSS (MB) of the frontend and of each model's workers (summed; the pids are
    asked for at every sample, so a replaced worker is followed)."""

    server: Server | None = None
    models: list[str] = field(default_factory=list)

    def pids(self) -> dict[str, list[int]]:
        found = {"frontend": [self.server.pid()]}
        for name in self.models:
            with contextlib.suppress(requests.RequestException):
                found[f"{name} workers"] = [p for p, _ in worker_pids(self.server, name)
                                            if p > 0]
        return found

    def sample(self):
        values = {}
        for label, pids in self.pids().items():
            try:
                rss = sum(psutil.Process(p).memory_info().rss for p in pids) / MB
            except (psutil.Error, TypeError):
                continue
            pss = [pss_mb(p) for p in pids]
            values[label] = (rss, None if None in pss else sum(pss))
        self.samples.append((time.monotonic(), values))


def slope_per_100k(points: list[tuple[float, float]], rate: float) -> float | None:
    """Least-squares MB per second, as MB per 100k requests at `rate` requests per second."""
    if len(points) < 2 or rate <= 0:
        return None
    t, mb = np.asarray(points).T
    return float(np.polyfit(t, mb, 1)[0]) / rate * 1e5


def soak_rows(label: str, samples: list, rate: float) -> list[Row]:
    t0 = samples[0][0]
    rss = [(t - t0, v[label][0]) for t, v in samples if label in v]
    pss = [(t - t0, v[label][1]) for t, v in samples if label in v and v[label][1] is not None]
    rows = [Row(f"soak {label}: RSS", rss[-1][1], "MB", rss[0][1], "end, beside start"),
            Row(f"soak {label}: RSS max", max(m for _, m in rss), "MB"),
            Row(f"soak {label}: RSS slope", slope_per_100k(rss, rate), "MB/100k req",
                detail=f"{len(rss)} samples")]
    if pss:
        rows.append(Row(f"soak {label}: PSS", pss[-1][1], "MB", pss[0][1],
                        f"end, beside start; max {max(m for _, m in pss):.0f}"))
    else:
        rows.append(Row(f"soak {label}: PSS", None, "MB", detail="smaps_rollup unreadable"))
    return rows


def soak_mixes(server: Server, models: Models, opts) -> list[Mix]:
    token, rest, oip = server.keys()["inference"], [], []
    for name in models.image + models.features:
        p = rest_payload(name)
        rest.append((f"/predictions/{name}", p.body, p.content_type))
        if (o := oip_payload(name)) is not None:
            oip.append((f"/v2/models/{name}/infer", o.body, o.content_type))
    mixes = [Mix(server.url("inference"), rest, token, opts.clients, opts.soak_seconds)]
    if oip:
        mixes.append(Mix(server.url("oip"), oip, token, max(1, opts.clients // 2),
                         opts.soak_seconds))
    return mixes


def soak_part(server: Server, models: Models, opts) -> tuple[list[Row], list]:
    served = models.image + models.features
    log.info("soak: %ss of mixed load (%s, REST and OIP), memory sampled every %ss",
             opts.soak_seconds, ", ".join(served), opts.sample_seconds)
    sampler = MemorySampler(opts.sample_seconds, server=server, models=served).start()
    mixes = soak_mixes(server, models, opts)
    end = mixes[0].started + max(1, round(opts.soak_seconds))
    every = max(5.0, opts.soak_seconds / 20)
    while (left := end - time.monotonic()) > 0:
        time.sleep(min(left, every))
        latest = sampler.samples[-1][1].get("frontend", (math.nan,))[0]
        log.info("soak: %.0f/%ss, frontend RSS %.0f MB", min(opts.soak_seconds,
                 time.monotonic() - mixes[0].started), opts.soak_seconds, latest)
    loads = [m.finish() for m in mixes]
    sampler.stop()
    done = sum(x.run.requests for x in loads)
    statuses = sum((x.statuses for x in loads), Counter())
    socket_errors = sum(x.socket_errors for x in loads)
    seconds = max(x.run.seconds for x in loads)
    rows = [Row("soak: requests", done, "req", detail=f"{done / seconds:.0f} req/s over "
                f"{seconds:.0f}s, {len(loads)} wrk"),
            Row("soak: failed", failures(statuses) + socket_errors, "req",
                detail=statuses_text(statuses, socket_errors)),
            Row("soak: wrk CPU", sum(x.run.client_cpu_pct for x in loads), "% of a core")]
    for label in ["frontend", *(f"{m} workers" for m in served)]:
        rows += soak_rows(label, sampler.samples, done / seconds)
    t0 = sampler.samples[0][0]
    return rows, [(t - t0, v) for t, v in sampler.samples]


# --- the run -------------------------------------------------------------------------------
@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    kill_timeline: dict = field(default_factory=dict)
    memory: list = field(default_factory=list)


def measure(server: Server, opts: argparse.Namespace) -> Report:
    """The parts in opts.parts against a running `server`, in order."""
    models = Models.of(server)
    report = Report()
    if "kill" in opts.parts:
        rows, report.kill_timeline = kill_part(server, models, opts)
        report.rows += rows
    if "slow" in opts.parts:
        report.rows += slow_part(server, models, opts)
    if "amplification" in opts.parts:
        report.rows += amplification_part(server, models, opts)
    if "soak" in opts.parts:
        rows, report.memory = soak_part(server, models, opts)
        report.rows += rows
    if "thin" in opts.parts:
        from kiln.loadtests import thin_images  # it builds on this module's clients and rows

        report.rows += thin_images.thin_part(server, models, opts)
    if "oip_flood" in opts.parts:
        flooded = oip_flood.flood(server, models.image[0], opts.clients, opts.load_seconds)
        report.rows += [Row(*row) for row in flooded.rows()]
    if "front_kill" in opts.parts:  # last: it resets every connection the proxy holds
        from kiln.loadtests import front_kill  # it builds on this module's clients and rows

        report.rows += front_kill.front_kill_part(server, models, opts)
    return report


def html_report(report: Report) -> str:
    labels = sorted({k for _, v in report.memory for k in v})
    charts = [svg.line_chart(f"{kind} during the soak",
                             {k: [(t, v[k][i]) for t, v in report.memory
                                  if k in v and v[k][i] is not None] for k in labels}, "MB")
              for i, kind in enumerate(("RSS", "PSS"))]
    if report.kill_timeline:
        tl = report.kill_timeline
        charts.append(svg.line_chart(
            f"Latency around the worker kill (at {tl['kill_s']:.1f}s)",
            {k: [(t, ms) for t, ms, _ in tl[k]] for k in ("probe", "bystander")}, "ms",
            "seconds since the load started"))
    rows = "".join(f"<tr><td>{html.escape(r.name)}</td><td>{_num(r.value)}</td>"
                   f"<td>{html.escape(r.unit)}</td><td>{_num(r.base)}</td><td>{_num(r.ratio)}"
                   f"</td><td>{html.escape(r.detail)}</td></tr>" for r in report.rows)
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>Kiln "
            "reliability</title><style>body{font-family:sans-serif;margin:24px}td,th{border:"
            "1px solid #ccc;padding:3px 8px}table{border-collapse:collapse}</style></head>"
            "<body><h1>Reliability</h1><table><tr><th>row</th><th>value</th><th>unit</th>"
            f"<th>base</th><th>x base</th><th>detail</th></tr>{rows}</table>"
            f"{''.join(f'<figure>{c}</figure>' for c in charts)}</body></html>\n")


def write(report: Report, opts: argparse.Namespace, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(opts).items()}
    figures = {"settings": settings,
               "rows": [{**asdict(r), "ratio": r.ratio} for r in report.rows],
               "kill_timeline": report.kill_timeline, "memory": report.memory}
    (out / "reliability.json").write_text(json.dumps(figures, indent=1) + "\n")
    (out / "reliability.html").write_text(html_report(report))


@contextlib.contextmanager
def own_server(folder: Path):
    """Kiln's default set, built where missing, served as kiln serve serves it: the front
    proxy on free public ports, TorchServe behind it on free ones of its own."""
    from kiln.model_store.build import ensure_built

    models = declaration.default_set()
    for name in models:
        ensure_built(name)
    server = Server(ServerSettings(folder, STORE, models, Ports.free(),
                                   internal_ports=Ports.free()))
    with server.running(timeout=240):
        yield server


def attached(run_dir: Path) -> Server:
    """The server `kiln serve` runs from `run_dir`, with its front proxy if it has one."""
    ports = Ports.saved(run_dir)
    server = Server(ServerSettings(run_dir, STORE, [], ports or Ports(),
                                   internal_ports=Ports.saved(run_dir, INTERNAL_PORTS_FILE)))
    if ports is None or server.pid() is None:
        raise SetupError(f"no TorchServe runs from {run_dir}: start one with kiln serve")
    return server


def add_arguments(p: argparse.ArgumentParser) -> None:
    def numbers(text: str) -> list[int]:
        return [int(n) for n in text.split(",")]

    p.add_argument("--parts", type=lambda t: t.split(","), default=list(PARTS),
                   help=f"parts to run, in order (default: {','.join(PARTS)})")
    p.add_argument("--load-seconds", type=float, default=20,
                   help="kill: seconds of load; the kill lands at a third (default: 20)")
    p.add_argument("--clients", type=int, default=8,
                   help="connections of the kill and soak loads (wrk) and good clients of "
                        "the slow part (default: 8)")
    p.add_argument("--slow", type=numbers, default=[64, 256],
                   help="slow connections held, a list (default: 64,256)")
    p.add_argument("--cell-seconds", type=float, default=5,
                   help="slow: seconds of good requests per cell (default: 5)")
    p.add_argument("--repeat", type=int, default=5,
                   help="amplification: calls of each request, the median counts (default: 5)")
    p.add_argument("--soak-seconds", type=float, default=600,
                   help="soak: seconds of mixed load (default: 600)")
    p.add_argument("--sample-seconds", type=float, default=5,
                   help="soak: seconds between memory samples (default: 5)")
    p.add_argument("--run-dir", type=Path,
                   help="measure the TorchServe kiln serve runs from here (default: start one "
                        "on free ports and stop it after)")
    p.add_argument("--out", type=Path,
                   help="folder for reliability.json and reliability.html (default: none)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m kiln.loadtests.reliability",
                                     description=__doc__.splitlines()[0])
    add_arguments(parser)
    opts = parser.parse_args(argv)
    if unknown := set(opts.parts) - set(PARTS):
        parser.error(f"unknown part(s) {', '.join(sorted(unknown))}: use {','.join(PARTS)}")
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    setup_logging()
    if not wrk.available():
        log.error("wrk is not installed: apt-get install wrk")
        return 1
    try:
        with tempfile.TemporaryDirectory(prefix="kiln-reliability-") as tmp:
            with (contextlib.nullcontext(attached(opts.run_dir)) if opts.run_dir
                  else own_server(Path(tmp))) as server:
                report = measure(server, opts)
    except SetupError as err:
        log.error("%s", err)
        return 1
    print(f"reliability on {os.cpu_count()} cores; load generator: {wrk.NAME}")
    print(format_table(report.rows))
    if opts.out:
        write(report, opts, opts.out)
        print(f"wrote {opts.out / 'reliability.json'} and {opts.out / 'reliability.html'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
