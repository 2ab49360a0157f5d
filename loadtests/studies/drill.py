"""Issue 18's acceptance drill: a new version of lenet taken through its life under constant
load, with the table of what each step cost the clients.

    python -m kiln.loadtests.studies.drill [--hold 10] [--clients 16]

Keep-alive clients (REST, OIP and gRPC in turn, none retrying) send unpinned requests while the
`kiln` commands a user types run one after another: deploy 2.0, shadow 2.0 at 20% (then off),
route 1.0=90 2.0=10, then 50/50, promote 2.0, rollback, promote again, retire 1.0. Per step:
requests, failed, connection resets, p50/p99, and the time the step took to take effect (the
first answer from a version it lets in, the last from one it shuts out, by the
X-Kiln-Model-Version header or x-kiln-model-version metadata, after versions.json changed).
Every answer is checked against the versions the route allowed when it was sent. The shadow's
agreement as Kiln reports it (kiln_shadow_* metrics, read before the shadow and after it is off
and scored) beside the agreement computed offline on the requests whose answers said they were
sampled (X-Kiln-Shadowed, x-kiln-shadowed), sent again pinned to each version over the same
protocol. Then, beside the
same load, the first 100 answers of a freshly registered version, warmed and not.

It serves from a temporary workspace: lenet.mar as built (1.0) and, as 2.0, a one-batch
training run with another seed (a full training run would add minutes without changing what
the drill measures: the export and archive of deploy, the register and warm-up, the routes).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import requests
from PIL import Image, ImageDraw

from kiln import declaration
from kiln.deploy import lifecycle, shadowing, versions
from kiln.deploy.ports import HOST, INTERNAL_PORTS_FILE, Ports
from kiln.deploy.routing import SHADOWED_HEADER
from kiln.deploy.server import Server, ServerSettings
from kiln.grpc_client import GrpcClient
from kiln.handlers.handler import VERSION_HEADER
from kiln.loadtests.studies import versions as versions_study

NAME = "lenet"
# How long after versions.json changed an answer may still come from what it replaced: the
# plugin reads the file every 100 ms; issue 18 asks for 1 s.
TAKE_EFFECT_S = 1.0
PROTOCOLS = ("rest", "oip", "grpc")
# A kept-alive connection the server drops, an answer lost with it.
RESET_ERRORS = (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected)
# Load before the steady step is measured: connections opened, gRPC channels set up.
SETTLE_S = 3.0
# Distinct inputs the clients send in turn (noisy_inputs): the shadow's agreement is only
# worth checking on inputs the versions agree on some of the time.
INPUTS = 50
SHADOW_FRACTION = 0.2


@dataclass(frozen=True)
class Step:
    name: str
    argv: tuple[str, ...]  # after `kiln`; empty: no command (the steady load)
    allowed: frozenset[str]  # versions unpinned answers may come from once it acted


STEPS = (
    Step("steady", (), frozenset({"1.0"})),
    Step("deploy 2.0", ("deploy", NAME, "--version", "2.0"), frozenset({"1.0"})),
    Step("shadow 2.0 at 20%", ("shadow", NAME, "2.0", "--fraction", str(SHADOW_FRACTION)),
         frozenset({"1.0"})),
    # Off before the route changes, so that Kiln's figures stop moving and can be read whole.
    Step("shadow off", ("shadow", NAME, "2.0", "--fraction", "0"), frozenset({"1.0"})),
    Step("route 90/10", ("route", NAME, "1.0=90", "2.0=10"), frozenset({"1.0", "2.0"})),
    Step("route 50/50", ("route", NAME, "1.0=50", "2.0=50"), frozenset({"1.0", "2.0"})),
    Step("promote 2.0", ("promote", NAME, "2.0"), frozenset({"2.0"})),
    Step("rollback", ("rollback", NAME), frozenset({"1.0"})),
    Step("promote 2.0", ("promote", NAME, "2.0"), frozenset({"2.0"})),
    Step("retire 1.0", ("retire", NAME, "1.0"), frozenset({"2.0"})),
)
SHADOW_ON, SHADOW_OFF = STEPS[2].name, STEPS[3].name
# How long Kiln's shadow figures must stay still to count as all scored.
STILL_S = 1.0


class DrillError(RuntimeError):
    pass


# -- the load -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Answer:
    protocol: str
    sent: float  # time.time(), comparable with versions.json's mtime
    answered: float
    status: int  # 0: no answer
    version: str | None  # X-Kiln-Model-Version (x-kiln-model-version metadata on gRPC)
    reset: bool
    # Answered, then the connection closed by the server (Connection: close): no request is
    # lost, the client opens another. nginx does it after keepalive_requests (1000) answers.
    closed: bool = False
    input: int = 0  # which of the caller's bodies it sent
    shadowed: str | None = None  # X-Kiln-Shadowed: the versions it was sampled for


class HttpCaller:
    """One keep-alive HTTP connection POSTing its bodies in turn to one path; `sent` is the
    index of the last one."""

    def __init__(self, protocol: str, port: int, path: str, bodies: list[bytes],
                 headers: dict):
        self.protocol, self.path, self.bodies, self.headers = protocol, path, bodies, headers
        self.conn = http.client.HTTPConnection(HOST, port, timeout=30)
        self.sent = -1

    def call(self) -> tuple[int, str | None, bool, bool, str | None]:
        self.sent = (self.sent + 1) % len(self.bodies)
        try:
            self.conn.request("POST", self.path, self.bodies[self.sent], self.headers)
            r = self.conn.getresponse()
            r.read()
        except RESET_ERRORS:
            self.conn.close()
            return 0, None, True, False, None
        except OSError:
            self.conn.close()
            return 0, None, False, False, None
        return (r.status, r.getheader(VERSION_HEADER), False, r.will_close,
                r.getheader(SHADOWED_HEADER))

    def close(self) -> None:
        self.conn.close()


class GrpcCaller:
    """One gRPC channel sending its bodies in turn; `sent` is the index of the last one."""

    protocol = "grpc"

    def __init__(self, port: int, token: str, bodies: list[bytes]):
        self.client, self.bodies = GrpcClient(f"{HOST}:{port}", token), bodies
        self.sent = -1

    def call(self) -> tuple[int, str | None, bool, bool, str | None]:
        self.sent = (self.sent + 1) % len(self.bodies)
        try:
            a = self.client.predict(NAME, self.bodies[self.sent], "image/png")
        except ConnectionError:  # the transport's UNAVAILABLE: the connection went
            return 0, None, True, False, None
        return a.status, a.version, False, False, a.shadowed

    def close(self) -> None:
        self.client.close()


def noisy_inputs(n: int = INPUTS, seed: int = 0) -> list[np.ndarray]:
    """n digits, lenet's example (a 7) and a drawn ring (a 0) in turn, each shifted a little
    and noisy, in whole grey levels (a PNG holds them exactly). The drill's 2.0 (one batch of
    training) answers 0 or 9 alone: on these it agrees with 1.0 about half the time (48% of
    200 here), where on noisy 7s alone it never does."""
    example = np.asarray(Image.open(declaration.get(NAME).examples[0].file).convert("L"),
                         dtype=np.float64)
    ring = Image.new("L", example.shape[::-1])
    ImageDraw.Draw(ring).ellipse((7, 4, 21, 24), outline=255, width=3)
    shapes = [example, np.asarray(ring, dtype=np.float64)]
    rng = np.random.default_rng(seed)
    return [np.clip(np.roll(shapes[i % 2], tuple(rng.integers(-3, 4, 2)), (0, 1))
                    + rng.normal(0, 90, example.shape), 0, 255).round() for i in range(n)]


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(out, format="PNG")
    return out.getvalue()


def bodies(inputs: list[np.ndarray]) -> dict[str, list[bytes]]:
    """Per protocol, the request body of each input: a PNG (REST, gRPC), FP32 pixels (OIP)."""
    pngs = [png(x) for x in inputs]
    oip = [json.dumps({"inputs": [{"name": "input", "shape": [1, 28, 28], "datatype": "FP32",
                                   "data": [x.tolist()]}]}).encode() for x in inputs]
    return {"rest": pngs, "oip": oip, "grpc": pngs}


def paths(version: str | None = None) -> dict[str, str]:
    """Per HTTP protocol, the path of an unpinned request or of one pinned to `version`."""
    if version is None:
        return {"rest": f"/predictions/{NAME}", "oip": f"/v2/models/{NAME}/infer"}
    return {"rest": f"/predictions/{NAME}/{version}",
            "oip": f"/v2/models/{NAME}/versions/{version}/infer"}


def headers(server: Server) -> dict[str, dict[str, str]]:
    auth = {"Authorization": f"Bearer {server.keys()['inference']}"}
    return {"rest": {**auth, "Content-Type": "image/png"},
            "oip": {**auth, "Content-Type": "application/json"}}


def callers(server: Server, clients: int, sent: dict[str, list[bytes]]) -> list:
    """`clients` callers, REST, OIP and gRPC in turn, each sending unpinned lenet requests,
    its protocol's bodies in turn."""
    ports, path, head = {"rest": server.ports.inference, "oip": server.ports.oip}, paths(), \
        headers(server)

    def make(protocol: str):
        if protocol == "grpc":
            return GrpcCaller(server.ports.grpc_inference, server.keys()["inference"],
                              sent["grpc"])
        return HttpCaller(protocol, ports[protocol], path[protocol], sent[protocol],
                          head[protocol])
    return [make(PROTOCOLS[i % len(PROTOCOLS)]) for i in range(clients)]


class Load:
    """Each caller in a thread of its own, sending its next request when the last is answered
    (no retry), from start() until stop(); answers holds every request."""

    def __init__(self, calling: list):
        self.answers: list[Answer] = []
        self._halt = threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(c,), daemon=True)
                         for c in calling]

    def _loop(self, caller) -> None:
        try:
            while not self._halt.is_set():
                sent = time.time()
                status, version, reset, closed, shadowed = caller.call()
                self.answers.append(Answer(caller.protocol, sent, time.time(), status,
                                           version, reset, closed, caller.sent, shadowed))
        finally:
            caller.close()

    @contextlib.contextmanager
    def running(self) -> Iterator[Load]:
        for t in self._threads:
            t.start()
        try:
            yield self
        finally:
            self._halt.set()
            for t in self._threads:
                t.join(timeout=60)


# -- the steps ----------------------------------------------------------------------------------
@dataclass
class Done:
    """A step as it ran: when it started, when versions.json last changed, when it ended."""

    step: Step
    started: float
    changed: float
    command_s: float
    ended: float = 0.0
    # The host's 1-minute load average as the step ended: the cores are shared, and a p99
    # off the steady one may be another process's.
    loadavg: float = 0.0
    answers: list[Answer] = field(default_factory=list)


def kiln(ws: Path, flags: list[str], argv: tuple[str, ...]) -> None:
    """A `kiln` command in a process of its own, as a user types it."""
    done = subprocess.run([sys.executable, "-m", "kiln.cli", "--workspace", str(ws), *argv,
                           *flags], capture_output=True, text=True)
    if done.returncode != 0:
        raise DrillError(f"kiln {' '.join(argv)} failed: {done.stderr}{done.stdout}")


def run_steps(ws: Path, flags: list[str], load: Load, hold: float,
              shadow: ShadowCheck) -> list[Done]:
    """Each step's command, then `hold` seconds of load (waiting on nothing else); the shadow
    checked while it is off (its offline requests are the "shadow off" step's load too)."""
    state = versions.state_file(ws / "run")
    done: list[Done] = []
    for step in STEPS:
        started = time.time()
        if step.name == SHADOW_ON:
            shadow.before = shadow.figures()
        if step.argv:
            kiln(ws, flags, step.argv)
        ended = time.time()
        changed = state.stat().st_mtime if state.exists() else started
        if step.name == SHADOW_OFF:
            shadow.check(load.answers)
        time.sleep(hold)  # the load runs on: what the step costs its clients
        done.append(Done(step, started, changed, ended - started, loadavg=os.getloadavg()[0]))
    closed = time.time()
    for d, after in zip(done, [*done[1:], None], strict=True):
        d.ended = after.started if after else closed
        d.answers = [a for a in load.answers if d.started <= a.sent < d.ended]
    return done


# -- the shadow -------------------------------------------------------------------------------
class ShadowCheck:
    """2.0's shadow agreement as Kiln reports it (the kiln_shadow_* figures' change over the
    shadow) and as computed offline: each answer marked shadowed, its input sent again pinned
    to the version that answered it and to each it was sampled for, over its protocol (a PNG's
    decoded pixels are not quite the FP32 values OIP is sent)."""

    def __init__(self, server: Server, sent: dict[str, list[bytes]]):
        self.server, self.sent = server, sent
        self.before = self.after = shadowing.Figures()
        self.marked: Counter = Counter()  # protocol -> answers marked shadowed
        self.offline: list[int] = [0, 0]  # agreeing, rows

    def figures(self) -> shadowing.Figures:
        return shadowing.read(self.server.url("metrics")).get((NAME, "2.0"), shadowing.Figures())

    def check(self, answers: list[Answer]) -> None:
        """Once the figures stand still (every sample scored), both agreements."""
        self.after = self.still()
        marked = [a for a in answers if a.shadowed]
        self.marked = Counter(a.protocol for a in marked)
        labels: dict[tuple[str, int, str], str] = {}
        with requests.Session() as session, GrpcClient(
                f"{HOST}:{self.server.ports.grpc_inference}",
                self.server.keys()["inference"]) as rpc:
            for a in marked:
                for v in a.shadowed.split(","):
                    got = [self.label(session, rpc, labels, a.protocol, a.input, u)
                           for u in (a.version, v)]
                    self.offline[0] += got[0] == got[1]
                    self.offline[1] += 1

    def still(self) -> shadowing.Figures:
        deadline = time.monotonic() + 60
        last = None
        while time.monotonic() < deadline:
            now = self.figures()
            if last is not None and key(now) == key(last):
                return now
            last = now
            time.sleep(STILL_S)
        raise DrillError(f"2.0's shadow figures kept moving for 60 s: {key(last)}")

    def label(self, session, rpc: GrpcClient, labels: dict, protocol: str, i: int,
              v: str) -> str:
        """The label `v` answers input i with over `protocol` (each asked once)."""
        if (protocol, i, v) not in labels:
            labels[(protocol, i, v)] = (self.grpc_label(rpc, i, v) if protocol == "grpc"
                                        else self.http_label(session, protocol, i, v))
        return labels[(protocol, i, v)]

    def http_label(self, session, protocol: str, i: int, v: str) -> str:
        port = {"rest": "inference", "oip": "oip"}[protocol]
        r = session.post(self.server.url(port) + paths(v)[protocol],
                         data=self.sent[protocol][i], headers=headers(self.server)[protocol],
                         timeout=30)
        r.raise_for_status()
        body = r.json()
        return body["label"] if protocol == "rest" else next(
            o["data"][0] for o in body["outputs"] if o["name"] == "label")

    def grpc_label(self, rpc: GrpcClient, i: int, v: str) -> str:
        a = rpc.predict(NAME, self.sent["grpc"][i], "image/png", version=v)
        if a.status != 200:
            raise DrillError(f"input {i} over gRPC pinned to {v}: {a}")
        return a.body["label"]

    def outcomes(self) -> dict[str, float]:
        """Sampled requests by outcome over the shadow."""
        was = self.before.outcomes
        return {k: n - was.get(k, 0) for k, n in sorted(self.after.outcomes.items())
                if n != was.get(k, 0)}

    def kiln_agreement(self) -> float:
        return percent(self.after.agreed - self.before.agreed, self.after.rows - self.before.rows)

    def offline_agreement(self) -> float:
        return percent(*self.offline)

    def line(self) -> str:
        marked = " ".join(f"{p} {n}" for p, n in sorted(self.marked.items()))
        outcomes = " ".join(f"{k} {n:g}" for k, n in self.outcomes().items())
        return (f"shadow 2.0 at {SHADOW_FRACTION:.0%}: answers marked shadowed {marked}; "
                f"Kiln's samples {outcomes}; agreement Kiln "
                f"{self.kiln_agreement():.2f}% of {self.after.rows - self.before.rows:g} rows, "
                f"offline {self.offline_agreement():.2f}% of {self.offline[1]} rows")


def percent(part: float, whole: float) -> float:
    """NaN of nothing: the line still prints when no answer was marked or scored."""
    return 100 * part / whole if whole else float("nan")


def key(f: shadowing.Figures) -> tuple:
    return sorted(f.outcomes.items()), f.rows, f.agreed


# -- the figures --------------------------------------------------------------------------------
def misrouted(d: Done, before: frozenset[str]) -> list[Answer]:
    """Answers of the step from a version the route did not allow when they were sent:
    before the change what the last step allowed, for TAKE_EFFECT_S after it either. One that
    names no version is misrouted too."""
    out = []
    for a in d.answers:
        if a.status != 200:
            continue
        if a.sent < d.changed:
            allowed = before
        elif a.sent <= d.changed + TAKE_EFFECT_S:
            allowed = before | d.step.allowed
        else:
            allowed = d.step.allowed
        if a.version not in allowed:
            out.append(a)
    return out


def took_effect(d: Done, before: frozenset[str]) -> float | None:
    """Seconds from versions.json's change to the first answer from each version let in and
    the last from each shut out, the longest; None when the step changed no version's lot,
    inf when a version let in never answered."""
    times = []
    for v in d.step.allowed - before:
        first = [a.answered for a in d.answers if a.version == v and a.sent >= d.changed]
        times.append(min(first) - d.changed if first else float("inf"))
    for v in before - d.step.allowed:
        last = [a.answered for a in d.answers if a.version == v]
        times.append(max(0.0, max(last) - d.changed) if last else 0.0)
    return max(times) if times else None


@dataclass(frozen=True)
class Row:
    name: str
    requests: int
    failed: int
    resets: int
    closed: int
    p50_ms: float
    p99_ms: float
    effect_s: float | None
    command_s: float
    by_version: dict[str, int]
    misrouted: int
    loadavg: float


def rows(done: list[Done]) -> list[Row]:
    out, before = [], STEPS[0].allowed
    for d in done:
        ok = [(a.answered - a.sent) * 1e3 for a in d.answers if a.status == 200]
        p50, p99 = (float(np.percentile(ok, q)) if ok else float("nan") for q in (50, 99))
        out.append(Row(d.step.name, len(d.answers), sum(a.status != 200 for a in d.answers),
                       sum(a.reset for a in d.answers), sum(a.closed for a in d.answers),
                       p50, p99, took_effect(d, before),
                       d.command_s, dict(sorted(Counter(a.version for a in d.answers
                                                        if a.version).items())),
                       len(misrouted(d, before)), d.loadavg))
        before = d.step.allowed
    return out


def table(found: list[Row]) -> str:
    steady = found[0].p99_ms
    lines = [f"{'step':<17} {'requests':>8} {'failed':>6} {'resets':>6} {'closed':>6} "
             f"{'p50 ms':>7} {'p99 ms':>7} {'p99/steady':>10} {'effect s':>8} "
             f"{'command s':>9} {'misrouted':>9} {'load1':>5}  answers by version"]
    for r in found:
        effect = "-" if r.effect_s is None else f"{r.effect_s:.3f}"
        shares = " ".join(f"{v}:{n}" for v, n in r.by_version.items())
        lines.append(f"{r.name:<17} {r.requests:>8} {r.failed:>6} {r.resets:>6} {r.closed:>6} "
                     f"{r.p50_ms:>7.1f} {r.p99_ms:>7.1f} {r.p99_ms / steady:>10.2f} "
                     f"{effect:>8} {r.command_s:>9.1f} {r.misrouted:>9} {r.loadavg:>5.1f}  "
                     f"{shares}")
    return "\n".join([*lines, closing(found)])


def closing(found: list[Row]) -> str:
    """Each step's p99 against twice the steady p99; the deploy step (its export and worker
    start share the cores with the load) apart."""
    steady = found[0].p99_ms
    over = [r.name for r in found[2:] if r.p99_ms > 2 * steady]
    return (f"steady p99 {steady:.1f} ms; deploy p99 {found[1].p99_ms:.1f} ms "
            f"({found[1].p99_ms / steady:.2f}x); the other steps "
            + (f"over 2x: {', '.join(over)}" if over else "all within 2x"))


def first_answers(done: list[Done], v: str, n: int = 100) -> str:
    """The first n unpinned answers of a freshly deployed (and warmed) version under the
    load, beside the steady step's."""
    answers = sorted((a for d in done for a in d.answers if a.version == v),
                     key=lambda a: a.sent)[:n]
    steady = [a for a in done[0].answers if a.status == 200]
    ms = [np.array([(a.answered - a.sent) * 1e3 for a in group]) for group in (answers, steady)]
    return (f"{v}'s first {len(answers)} answers under load: "
            f"p50 {np.percentile(ms[0], 50):.1f} p99 {np.percentile(ms[0], 99):.1f} "
            f"max {ms[0].max():.1f} ms (steady p99 {np.percentile(ms[1], 99):.1f} ms)")


# -- warm-up beside the load --------------------------------------------------------------------
def warm_up(ws: Path) -> None:
    """1.0 (retired, its lenet.mar kept) registered again as a fresh version: its first 100
    pinned answers without and with Kiln's warm-up, beside the default's, under the load."""
    target = lifecycle.Target.of(ws / "run", ws / "model_store")
    like = target.management.describe(NAME, "2.0")
    print(f"2.0 steady   {versions_study.shown(versions_study.timings(target, '2.0'))}")
    target.management.register(f"{NAME}.mar", like)
    print(f"1.0 cold     {versions_study.shown(versions_study.timings(target, '1.0'))}")
    target.management.unregister(NAME, "1.0")
    target.management.register(f"{NAME}.mar", like)
    sent = lifecycle.warm(target, NAME, "1.0", int(like["batchSize"]))
    print(f"1.0 warmed   {versions_study.shown(versions_study.timings(target, '1.0'))}"
          f"   ({sent} warm-up requests)")
    target.management.unregister(NAME, "1.0")


# -- the workspace ------------------------------------------------------------------------------
def prepare(ws: Path, mar: Path) -> None:
    """A workspace whose store holds lenet.mar (1.0) and whose artifacts hold other weights
    (a one-batch run with seed 1): what `kiln deploy lenet --version 2.0` builds."""
    from kiln.training import train

    (ws / "model_store").mkdir(parents=True)
    shutil.copy(mar, ws / "model_store" / f"{NAME}.mar")
    train.train(train.config_for([NAME, "--out", str(ws / "artifacts" / NAME), "--log-dir",
                                  str(ws / "runs"), "--dry-run", "--seed", "1"]))


@contextlib.contextmanager
def served(ws: Path) -> Iterator[tuple[Server, list[str]]]:
    """`kiln serve lenet --enable-model-api` from `ws`; the server and the flags that name
    it to the other commands; stopped afterwards. Each a process of its own, as the steps'
    commands: a study imports nothing of kiln.cli (layers import downward only)."""
    flags = ["--run-dir", str(ws / "run"), "--store", str(ws / "model_store"),
             *[arg for api, port in vars(Ports.free()).items()
               for arg in (f"--{api.replace('_', '-')}-port", str(port))]]
    try:
        # To a file, not a pipe: the servers it starts outlive it and would hold a pipe open.
        log = ws / "serve.log"
        with open(log, "w") as out:
            code = subprocess.run([sys.executable, "-m", "kiln.cli", "--workspace", str(ws),
                                   "serve", NAME, "--enable-model-api", "--no-build", *flags],
                                  stdin=subprocess.DEVNULL, stdout=out,
                                  stderr=subprocess.STDOUT).returncode
        if code != 0:
            raise DrillError(f"kiln serve failed: {log.read_text(errors='replace')[-4000:]}")
        run = ws / "run"
        yield Server(ServerSettings(run, ws / "model_store", [NAME], Ports.saved(run),
                                    internal_ports=Ports.saved(run, INTERNAL_PORTS_FILE))), flags
    finally:
        subprocess.run([sys.executable, "-m", "kiln.cli", "--workspace", str(ws), "stop",
                        "--run-dir", str(ws / "run")], stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def drill(ws: Path, clients: int, hold: float, warm: bool) -> tuple[list[Row], ShadowCheck]:
    """The drill on a workspace prepared by prepare(); its rows and the shadow's check, the
    table printed."""
    sent = bodies(noisy_inputs())
    with served(ws) as (server, flags):
        load = Load(callers(server, clients, sent))
        shadow = ShadowCheck(server, sent)
        with load.running():
            time.sleep(SETTLE_S)
            done = run_steps(ws, flags, load, hold, shadow)
            if warm:
                warm_up(ws)
    found = rows(done)
    print(table(found))
    print(shadow.line())
    print(first_answers(done, "2.0"))
    return found, shadow


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hold", type=float, default=10,
                        help="seconds of load after each step (default: 10)")
    parser.add_argument("--clients", type=int, default=16,
                        help="keep-alive clients, REST, OIP and gRPC in turn (default: 16)")
    args = parser.parse_args(argv)
    from kiln.model_store.build import ensure_built

    with tempfile.TemporaryDirectory(prefix="kiln-drill-") as tmp:
        prepare(Path(tmp), ensure_built(NAME))
        drill(Path(tmp), args.clients, args.hold, warm=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
