"""A lone client and a dying worker (issue 21, parts 2 and 3; docs/batching.md), through the
front proxy: `python -m kiln.loadtests.studies.edges [--part lone|death|both] [--kills N]`.

- lone: lenet unbatched, batched by TorchServe (as `make serve` batches it) and batched
  greedily (Kiln's agent), three servers measured in turn with wrk at 1 and 16 clients, round
  after round; medians, ratios, and TorchServe's own mean queue time per request.
- death: for TorchServe's batching and greedy batching, SIGKILL a READY lenet worker N times
  under 16 closed-loop clients, each request's send and answer times and status kept; the
  failures, the most between one kill and the next, the longest wait from a kill to the
  answer of a request sent before it, and the requests never answered.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import logging
import os
import signal
import statistics
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import requests

from kiln.console import setup_logging
from kiln.deploy.server import HOST, ModelServing, Ports, Server, ServerSettings
from kiln.handlers.cores import usable_cores
from kiln.loadtests import wrk
from kiln.loadtests.studies.reliability.served import rest_payload, worker_pids
from kiln.workspace import Workspace

log = logging.getLogger("kiln.edges")
MODEL = "lenet"
CLIENT_TIMEOUT_S = 30


def serve(run_dir: Path, serving: ModelServing | None = None, greedy: bool = True) -> Server:
    settings = ServerSettings(run_dir=run_dir, model_store=Workspace.current().model_store,
                              models=[MODEL], ports=Ports.free(), internal_ports=Ports.free(),
                              serving={MODEL: serving} if serving else {},
                              greedy_batching=greedy)
    return Server(settings)


@dataclass
class Cell:
    config: str
    clients: int
    runs: list[wrk.WrkRun]
    # TorchServe's own figures over the cell's runs: requests and their time in its queue,
    # which includes a batch's wait for its delay (set when the batch is taken).
    requests: float = 0.0
    queue_us: float = 0.0

    def median(self, figure: str) -> float:
        return statistics.median(getattr(r, figure) for r in self.runs)


def torchserve_counters(server: Server) -> tuple[float, float]:
    """lenet's ts_inference_requests_total and ts_queue_latency_microseconds, read from the
    metrics page (cumulative counters)."""
    page = requests.get(f"{server.url('metrics')}/metrics", timeout=10).text
    totals = dict.fromkeys(("ts_inference_requests_total", "ts_queue_latency_microseconds"), 0.0)
    for line in page.splitlines():
        name, _, rest = line.partition("{")
        if name in totals and f'model_name="{MODEL}"' in rest:
            totals[name] += float(line.rsplit(" ", 1)[1])
    return totals["ts_inference_requests_total"], totals["ts_queue_latency_microseconds"]


CONFIGS = ("unbatched", "TorchServe's batching", "greedy batching")


def predictions_url(server: Server) -> str:
    return f"{server.url('inference')}/predictions/{MODEL}"


def lone(seconds: int, rounds: int) -> list[Cell]:
    """Unbatched, TorchServe's batching and greedy batching, three servers up at once and
    measured in turn, round after round, so that what else the machine runs weighs on each
    alike; each cell's figures are the median of its rounds."""
    payload = rest_payload(MODEL)
    batched = ModelServing.derived(usable_cores(), 1)  # as `make serve` serves lenet
    unbatched = ModelServing(workers=batched.workers, batch_size=1, max_batch_delay_ms=0)
    chosen = dict(zip(CONFIGS, ((unbatched, False), (batched, False), (batched, True)),
                      strict=True))
    cells = {(c, n): Cell(c, n, []) for c in CONFIGS for n in (1, 16)}
    with contextlib.ExitStack() as stack:
        servers = {}
        for config, (serving, greedy) in chosen.items():
            run_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kiln-edges-")))
            servers[config] = stack.enter_context(serve(run_dir, serving, greedy).running())
        for server in servers.values():
            wrk.run(predictions_url(server), payload.body, payload.content_type,
                    server.keys()["inference"], 16, 2)  # warm-up
        for i in range(rounds):
            log.info("round %d of %d", i + 1, rounds)
            for (config, clients), cell in cells.items():
                server = servers[config]
                before = torchserve_counters(server)
                cell.runs.append(wrk.run(predictions_url(server), payload.body,
                                         payload.content_type, server.keys()["inference"],
                                         clients, seconds))
                after = torchserve_counters(server)
                cell.requests += after[0] - before[0]
                cell.queue_us += after[1] - before[1]
    return list(cells.values())


def print_lone(cells: list[Cell]) -> None:
    base = {c.clients: c for c in cells if c.config == "unbatched"}
    stock = {c.clients: c for c in cells if c.config == "TorchServe's batching"}
    print(f"lenet through the front proxy, medians of {len(cells[0].runs)} rounds")
    print(f"{'':<24}{'clients':>8}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}"
          f"{'p50 - unbatched':>17}{'p50 x unbatched':>17}{'req/s x TorchServe':>20}"
          f"{'queue us':>10}{'errors':>8}")
    for c in cells:
        p50, rps = c.median("p50_ms"), c.median("throughput_rps")
        unbatched = base[c.clients].median("p50_ms")
        print(f"{c.config:<24}{c.clients:>8}{rps:>9.0f}{p50:>9.2f}{c.median('p99_ms'):>9.2f}"
              f"{p50 - unbatched:>+16.2f} {p50 / unbatched:>16.2f} "
              f"{rps / stock[c.clients].median('throughput_rps'):>19.2f}"
              f"{c.queue_us / max(c.requests, 1):>10.0f}{sum(r.errors for r in c.runs):>8}")
    print("queue us: TorchServe's mean time in its queue per request over all rounds "
          "(ts_queue_latency_microseconds), a batch's wait for its delay included")


@dataclass
class Call:
    sent: float
    answered: float | None = None
    status: int = 0


class Clients:
    """Closed-loop clients, each request's times and status kept."""

    def __init__(self, server: Server, clients: int):
        self.port = server.ports.inference
        payload = rest_payload(MODEL)
        self.body = payload.body
        self.headers = {"Content-Type": payload.content_type,
                        "Authorization": f"Bearer {server.keys()['inference']}"}
        self.calls: list[Call] = []
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self.loop) for _ in range(clients)]
        for t in self.threads:
            t.start()

    def loop(self):
        conn = http.client.HTTPConnection(HOST, self.port, timeout=CLIENT_TIMEOUT_S)
        while not self.stopping.is_set():
            call = Call(time.monotonic())
            self.calls.append(call)
            try:
                conn.request("POST", f"/predictions/{MODEL}", body=self.body,
                             headers=self.headers)
                resp = conn.getresponse()
                resp.read()
                call.status = resp.status
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection(HOST, self.port, timeout=CLIENT_TIMEOUT_S)
            call.answered = time.monotonic()
        conn.close()

    def stop(self) -> list[Call]:
        self.stopping.set()
        for t in self.threads:
            t.join()
        return self.calls


def all_ready(server: Server, workers: int, but: int | None = None) -> bool:
    with contextlib.suppress(requests.RequestException):
        listed = worker_pids(server, MODEL)
        return sum(s == "READY" and p != but for p, s in listed) == workers
    return False


def wait(condition, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError("timed out waiting")
        time.sleep(0.02)


@dataclass
class Deaths:
    config: str
    kills: int
    requests: int
    statuses: Counter
    most_failed_at_a_kill: int  # failed requests answered between a kill and the next
    longest_wait_s: float  # from a kill to the answer of a request sent before it
    longest_failed_wait_s: float  # the same for the requests that failed
    unanswered: int  # no answer within the client's timeout


def death(kills: int, clients: int, greedy: bool) -> Deaths:
    with tempfile.TemporaryDirectory(prefix="kiln-edges-") as run_dir:
        server = serve(Path(run_dir), greedy=greedy)
        with server.running():
            workers = server.settings.serving_defaults().workers
            load = Clients(server, clients)
            kill_times = []
            try:
                for _ in range(kills):
                    wait(lambda: all_ready(server, workers))
                    time.sleep(0.3)  # load flows again before the next kill
                    pid = next(p for p, s in worker_pids(server, MODEL) if s == "READY")
                    os.kill(pid, signal.SIGKILL)
                    kill_times.append(time.monotonic())
                    wait(lambda pid=pid: all_ready(server, workers, but=pid))
                time.sleep(0.5)
            finally:
                calls = load.stop()
    config = "greedy batching" if greedy else "TorchServe's batching"
    return summarize(config, calls, kill_times)


def summarize(config: str, calls: list[Call], kill_times: list[float]) -> Deaths:
    failed_at, waits, failed_waits = Counter(), [0.0], [0.0]
    for c in calls:
        if c.status != 200 and c.answered is not None:
            failed_at[sum(k <= c.answered for k in kill_times)] += 1
    for k in kill_times:
        for c in calls:
            if c.sent < k and (c.answered is None or c.answered > k):
                waits.append((c.answered or float("inf")) - k)
                if c.status != 200:
                    failed_waits.append(waits[-1])
    return Deaths(config, len(kill_times), len(calls), Counter(c.status for c in calls),
                  max(failed_at.values(), default=0), max(waits), max(failed_waits),
                  sum(c.status == 0 and (c.answered or 0) - c.sent >= CLIENT_TIMEOUT_S
                      for c in calls))


def print_deaths(rows: list[Deaths], batch_size: int) -> None:
    print(f"{'lenet worker SIGKILLed':<24}{'kills':>6}{'requests':>9}{'failed':>7}"
          f"{'most at a kill':>15}{'longest wait s':>15}{'of a failed one':>16}"
          f"{'unanswered':>11}  statuses")
    for r in rows:
        failed = sum(n for s, n in r.statuses.items() if s != 200)
        print(f"{r.config:<24}{r.kills:>6}{r.requests:>9}{failed:>7}"
              f"{r.most_failed_at_a_kill:>15}{r.longest_wait_s:>15.3f}"
              f"{r.longest_failed_wait_s:>16.3f}{r.unanswered:>11}  "
              + ", ".join(f"{s}: {n}" for s, n in sorted(r.statuses.items())))
    print(f"(a killed worker holds one batch: at most {batch_size} requests; a wait runs from "
          "a kill to the answer of a request sent before it, the one worker left serving all "
          "16 clients meanwhile)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20, help="worker kills (default: 20)")
    parser.add_argument("--seconds", type=int, default=3,
                        help="per wrk run (default: 3)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="runs per cell, interleaved (default: 5)")
    parser.add_argument("--part", choices=["lone", "death", "both"], default="both")
    args = parser.parse_args(argv)
    setup_logging()
    if args.part in ("lone", "both"):
        print_lone(lone(args.seconds, args.rounds))
    if args.part in ("death", "both"):
        rows = [death(args.kills, 16, greedy) for greedy in (False, True)]
        batch = ModelServing.derived(usable_cores(), 1).batch_size
        print_deaths(rows, batch)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
