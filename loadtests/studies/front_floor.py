"""What any front proxy costs at the top, and how much of it is Kiln's: lenet served five ways,
all up, taking turns under wrk (issue 21, part 1).

    python -m kiln.loadtests.studies.front_floor [--clients 16,32] [--rounds 4] [--seconds 5]

- plain best: loadtests/plain_handler.py at bench.PLAIN_BEST_CONFIG on TorchServe as released,
  straight to its port (kiln bench's "plain best");
- plain best, bare proxy: the same TorchServe behind the cheapest nginx that forwards at all
  (one worker, kept-alive upstream connections, no access log, no key check, no header of its
  own: `bare_conf`);
- kiln as served: `kiln serve lenet` (its serving defaults here) through Kiln's front proxy;
- kiln, bare proxy: the same TorchServe behind the bare nginx (which adds TorchServe's own
  inference token, as Kiln's front does);
- kiln direct: the same TorchServe, straight to its port.

Each cell runs at every --clients in every round, the order reversed every other round;
medians of the rounds. Printed per cell: inputs/s, its ratio to plain best at the same
clients, p50, wrk's own CPU (% of one core), and the CPU microseconds a request of the workers,
of TorchServe's frontend (its JVM) and of the proxy in front, if any. The bare proxy's ratio is
the floor: what a separate proxy process costs a CPU-bound server on these cores whatever it
does; Kiln's front against the bare one is what Kiln's own work costs on top.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import psutil

from kiln.client import Client
from kiln.console import setup_logging
from kiln.deploy import supervise
from kiln.deploy.ports import HOST
from kiln.deploy.server import Ports, Server
from kiln.loadtests import bench, declared, payloads, stock, wrk
from kiln.loadtests.bench_table import DIRECT, FRONT
from kiln.loadtests.studies.handler_cost import cpu_seconds, processes
from kiln.model_store.build import ensure_built
from kiln.workspace import Workspace

MODEL = "lenet"
BARE = "bare"  # a cell's way in: through BareProxy


def bare_conf(folder: Path, port: int, upstream_port: int, token: str | None,
              connections: int = 1024) -> str:
    """The least nginx that forwards: the settings Kiln's front shares with any HTTP/1.1
    reverse proxy that keeps its upstream connections, and nothing else."""
    auth = f'        proxy_set_header Authorization "Bearer {token}";\n' if token else ""
    temp = "".join(f"    {kind}_temp_path {folder / kind};\n"
                   for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return (f"daemon off;\nworker_processes 1;\npid {folder / 'nginx.pid'};\n"
            "error_log stderr warn;\n"
            f"events {{\n    worker_connections {connections};\n}}\n"
            "http {\n    access_log off;\n" + temp
            + f"    upstream backend {{\n        server {HOST}:{upstream_port};\n"
            f"        keepalive {connections // 2};\n    }}\n"
            f"    server {{\n        listen {HOST}:{port};\n"
            "        location / {\n            proxy_pass http://backend;\n"
            "            proxy_http_version 1.1;\n"
            '            proxy_set_header Connection "";\n' + auth
            + "        }\n    }\n}\n")


class BareProxy:
    """A bare nginx (bare_conf) on a free port in front of `upstream` (a base URL)."""

    def __init__(self, folder: Path, upstream: str, token: str | None):
        folder.mkdir(parents=True)
        self.port = Ports.free().inference  # one of a set no other server here is given
        (folder / supervise.CONF).write_text(
            bare_conf(folder, self.port, urlsplit(upstream).port, token))
        self.proc = subprocess.Popen(supervise.nginx_command(folder), stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not _accepts(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the bare nginx in {folder} did not start")
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def processes(self) -> list[psutil.Process]:
        master = psutil.Process(self.proc.pid)
        return [master, *master.children()]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _accepts(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((HOST, port)) == 0


class Cell:
    def __init__(self, name: str, server: Server, target: bench.Target):
        self.name, self.server, self.target = name, server, target
        self.proxy: BareProxy | None = None

    def endpoint(self) -> tuple[str, str]:
        if self.proxy is not None:
            return self.proxy.url, ""  # the bare proxy adds TorchServe's token
        return self.target.endpoint(self.server)

    def processes(self) -> dict[str, list[psutil.Process]]:
        procs = processes(self.server, nginx=self.target.via == FRONT)
        if self.proxy is not None:
            procs["nginx"] = self.proxy.processes()
        return procs


def cells(root: Path) -> list[Cell]:
    decl, dirs = declared.resolve(MODEL, [])
    first = payloads.first_payload(decl)
    body = (first.body, first.content_type)
    kiln = bench.kiln_server(root / "kiln", MODEL, bench.kiln_serve_config(MODEL, dirs), dirs)
    store = root / "store"
    store.mkdir()
    plain_name = stock.build_plain(MODEL, decl.version, Workspace.current().exports(MODEL),
                                   store)
    plain = Server(stock.BenchSettings(root / "plain", store, [plain_name], Ports.free(),
                                       serving={plain_name: bench.PLAIN_BEST_CONFIG},
                                       log_config=bench.PLAIN_BEST_LOGS,
                                       **bench.PLAIN_BEST_TORCHSERVE))

    def target(via, model):
        return bench.Target(MODEL, via, "", model, body, first.label)

    return [Cell("plain best", plain, target(DIRECT, plain_name)),
            Cell("plain best, bare proxy", plain, target(DIRECT, plain_name)),
            Cell("kiln as served", kiln, target(FRONT, MODEL)),
            Cell("kiln, bare proxy", kiln, target(DIRECT, MODEL)),
            Cell("kiln direct", kiln, target(DIRECT, MODEL))]


def check(cell: Cell) -> None:
    """One request first, whichever way in: a 200 with the expected answer."""
    answer = Client(*cell.endpoint()).predict(cell.target.model, *cell.target.payload)
    problem = (payloads.rest_problem(answer.body, cell.target.expect) if answer.ok
               else f"HTTP {answer.status}: {answer.body}")
    if problem:
        raise RuntimeError(f"{cell.name}: {problem}")


def measure(cell: Cell, clients: int, seconds: int) -> dict[str, float]:
    base, token = cell.endpoint()
    procs = cell.processes()
    before = {k: cpu_seconds(v) for k, v in procs.items()}
    run = wrk.run(f"{base}/predictions/{cell.target.model}", *cell.target.payload, token,
                  clients, seconds)
    if run.errors:
        raise RuntimeError(f"{cell.name}, {clients} clients: {run.errors} failed requests")
    requests = max(1, run.requests)
    return {"inputs/s": run.throughput_rps, "p50 ms": run.p50_ms,
            "wrk cpu %": run.client_cpu_pct,
            **{k: (cpu_seconds(v) - before[k]) * 1e6 / requests for k, v in procs.items()}}


def table(runs: dict[tuple[str, int], list[dict[str, float]]]) -> list[str]:
    lines = ["| cell | clients | inputs/s | x plain best | p50 ms | wrk CPU % | workers us/rq "
             "| JVM us/rq | proxy us/rq | server us/rq |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (name, clients), rows in runs.items():
        med = {k: statistics.median(r.get(k, 0.0) for r in rows) for k in rows[0]}
        best = statistics.median(r["inputs/s"] for r in runs["plain best", clients])
        server = med["workers"] + med["frontend"] + med.get("nginx", 0.0)
        lines.append(f"| {name} | {clients} | {med['inputs/s']:,.0f} | "
                     f"{med['inputs/s'] / best:.3f} | {med['p50 ms']:.2f} | "
                     f"{med['wrk cpu %']:.0f} | {med['workers']:.0f} | {med['frontend']:.0f} | "
                     + (f"{med['nginx']:.0f}" if "nginx" in med else "") + f" | {server:.0f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", default="16,32", help="wrk connections, a list (default 16,32)")
    p.add_argument("--rounds", type=int, default=4, help="turns of each cell (default 4)")
    p.add_argument("--seconds", type=int, default=5, help="each run (default 5)")
    opts = p.parse_args(argv)
    setup_logging()
    ensure_built(MODEL)
    runs: dict[tuple[str, int], list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="kiln-front-floor-") as root, \
            contextlib.ExitStack() as running:
        found = cells(Path(root))
        for server in dict.fromkeys(c.server for c in found):
            running.enter_context(server.running(timeout=300))
        for i, cell in enumerate(found):
            if "bare proxy" in cell.name:
                base, token = cell.target.endpoint(cell.server)
                cell.proxy = BareProxy(Path(root) / f"bare-{i}", base, token)
                running.callback(cell.proxy.stop)
        for cell in found:
            check(cell)
            measure(cell, 32, 4)  # warm-up: the JVM compiles its hot paths
        for turn in range(opts.rounds):
            for clients in map(int, opts.clients.split(",")):
                for cell in found[::-1] if turn % 2 else found:
                    runs.setdefault((cell.name, clients), []).append(
                        measure(cell, clients, opts.seconds))
            print(f"round {turn + 1}: load average {psutil.getloadavg()[0]:.1f}", flush=True)
    print("\n".join(table(runs)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
