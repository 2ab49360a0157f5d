"""`kiln bench`'s observability pair: Kiln through its front proxy at the comparison
configuration with everything that watches requests and the model off, against all of it on
as a production user would run it, at two sample rates of traces and payloads (SAMPLES): ON
at 1%, SPARSE at 0.1%. The servers are up together, warm up (WARM_UP_ROUNDS rounds' worth of
load each) and take turns, ROUNDS times each (off first, then off last, and so on), so that a
noisy neighbour weighs on all alike; then the same with fresh servers, PAIRS times in all
(a "pair": the off server and the on servers it is compared with). Each figure is the median
of every round of its row.

Always on in all rows (nothing turns them off): the request id, traceparent and
Server-Timing. On in the on rows only:
- Kiln's JSON access log (deploy/access_log.py);
- OTLP spans of the row's share of the fresh traces, to a local OTLP/HTTP sink started here
  that reads each export and drops it: production settings, since exporting every trace cost
  0.75x of the throughput and 1% 0.98x (loadtests/studies/tracing_cost.py);
- the answer and drift metrics (handlers/watch.py);
- the payload log at the row's share (handlers/payload_log.py).
What is sampled costs by the sampled request (four stage spans built and exported by the
worker through the OpenTelemetry SDK, a payload record written: a few hundred microseconds
of a worker's CPU on 2 busy cores), the rest by every request (the access log line, the
answers counted): the two rows tell them apart.
Server CPU is that of every process serving the row: TorchServe and its workers, nginx, Kiln's
metrics exporter and its proxy-spans sender.
"""

from __future__ import annotations

import contextlib
import statistics
import threading
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil

from kiln.deploy.server import HOST, ModelServing, Ports, Server
from kiln.loadtests import stock
from kiln.loadtests.bench_table import Row
from kiln.workspace import Workspace

OFF, ON, SPARSE = "kiln observability off", "kiln observability on", "kiln observability on 0.1%"
ROWS = (OFF, ON, SPARSE)
# Each on row's share of fresh traces sampled and of requests in the payload log.
SAMPLES = {ON: 0.01, SPARSE: 0.001}
FOLDERS = {OFF: "obs-off", ON: "obs-on", SPARSE: "obs-sparse"}
# Pairs of fresh servers, one after the other, each measured ROUNDS times a row: a server keeps
# its speed for its life (its JVM's compiled code, its workers' memory): two servers of one
# configuration, side by side, differed by 4.6% of throughput on a busy machine (lenet, 32
# clients, 6 rounds); on a quiet one, three such pairs gave 1.000, 1.001 and 1.010x.
PAIRS = 2
ROUNDS = 4
# Each server's warm-up, in rounds' worth of load: the JVM compiles its hot paths for tens of
# seconds. After 1 s, the first round's frontend CPU was 200 to 230 us a request against 75 to
# 114 in later ones (lenet, 32 clients), and one round in four was an outlier either way; after
# 2 rounds (10 s), the first two rounds' was still 90 to 106 against 76 to 91 in the four after
# (three pairs of two "off" servers, 6 rounds each).
WARM_UP_ROUNDS = 4


class _Sink(BaseHTTPRequestHandler):
    # Kept-alive connections, as a collector keeps them (http.server's default, HTTP/1.0,
    # would make each worker's exporter open a connection per export).
    protocol_version = "HTTP/1.1"

    def do_POST(self):  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def otlp_sink() -> Iterator[str]:
    """The base URL of an OTLP/HTTP endpoint that accepts every export and keeps nothing."""
    sink = ThreadingHTTPServer((HOST, 0), _Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    try:
        yield f"http://{HOST}:{sink.server_port}"
    finally:
        sink.shutdown()
        sink.server_close()


def serving_cpu_seconds(server: Server) -> float:
    """CPU seconds so far of every process serving `server`: TorchServe and its workers,
    nginx, Kiln's metrics exporter and proxy spans."""
    procs = [*server.front.processes(), *with_children(server.pid()),
             *helper_processes(server)]
    total = 0.0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            total += times.user + times.system
    return total


def helper_processes(server: Server) -> list[psutil.Process]:
    """Kiln's metrics exporter and proxy-spans process of `server`, where they run, with
    their children."""
    return [*with_children(server.exporter.pid()),
            *with_children(server.proxy_spans.process.pid())]


def with_children(pid: int | None) -> list[psutil.Process]:
    """The process and its children; none for None, a process that does not run (the off row
    has no proxy spans): psutil.Process(None) would be this process, with its wrk and the
    other row's helpers, 67 to 87 us a request more."""
    if pid is None:
        return []
    with contextlib.suppress(psutil.Error):
        proc = psutil.Process(pid)
        return [proc, *proc.children(recursive=True)]
    return []


def server(root: Path, name: str, config: ModelServing, models_dirs: list[Path], row: str,
           sink: str) -> Server:
    """Kiln's server of `name` for one of ROWS: all of the observability off, or all of it
    on at the row's SAMPLES."""
    sample = SAMPLES.get(row)
    extra = (dict(access_log=True, otlp_endpoint=sink, trace_sample=sample, payload_log=sample)
             if sample is not None else dict(watch=False))
    return Server(stock.BenchSettings(
        root / FOLDERS[row], Workspace.current().model_store, [name],
        Ports.free(), models_dirs=models_dirs, internal_ports=Ports.free(),
        serving={name: config}, **extra))


def median_row(runs: list[Row]) -> Row:
    """One row from the rounds of one server: each figure's median, requests and errors
    summed."""
    def med(field):
        values = [getattr(r, field) for r in runs]
        return None if None in values else statistics.median(values)

    return replace(runs[0], **{f: med(f) for f in (
        "throughput", "p50_ms", "p99_ms", "client_cpu_pct", "server_cpu_pct",
        "server_cpu_us", "proxy_cpu_us")}, requests=sum(r.requests for r in runs),
        errors=sum(r.errors for r in runs))
