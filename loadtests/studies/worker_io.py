"""What Kiln's worker site hook saves, and where the front proxy's cost goes, by process:

    python -m kiln.loadtests.studies.worker_io [--clients 16,32] [--rounds 4] [--seconds 5]

Four servers of lenet, all up, taking turns (the order reversed every other round), wrk at
each --clients, medians of the rounds:
- kiln front: Kiln as `kiln serve lenet` runs it (its serving defaults here), through nginx;
- kiln front, no site: the same without deploy/worker_site (TorchServe's own frame reading,
  torch imported at start);
- kiln direct: the first server, straight to TorchServe's port;
- plain best: loadtests/plain_handler.py at bench.PLAIN_BEST_CONFIG on TorchServe as released
  (kiln bench's "plain best").
Printed per cell: inputs/s, p50, and CPU microseconds a request of the workers, of
TorchServe's frontend (its JVM) and of nginx.

Quiet machine, lenet at w2 b8 d1, 3 rounds of 5 s (medians; inputs/s, then CPU us a request of
the workers, the JVM and nginx):

| row | 16 clients | 32 clients |
|---|---|---|
| kiln front | 3,829 (228, 114, 54) | 5,391 (201, 80, 48) |
| kiln front, no site | 3,531 (274, 148, 54) | 4,665 (245, 98, 49) |
| kiln direct | 4,920 (211, 103) | 6,618 (191, 74) |
| plain best | 5,069 (201, 122) | 6,218 (208, 79) |

Kiln's handler without TorchServe's PredictionTime line (handler.skip_prediction_time; a
scratch toggle, 32 clients, 4 rounds): 5,316 against 4,803 inputs/s with it, workers 203
against 219 and JVM 88 against 105 us a request.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import tempfile
from pathlib import Path

import psutil

from kiln.console import setup_logging
from kiln.deploy.server import Ports, Server
from kiln.loadtests import bench, declared, payloads, stock, wrk
from kiln.loadtests.bench_table import DIRECT, FRONT
from kiln.loadtests.studies.handler_cost import cpu_seconds, processes
from kiln.model_store.build import ensure_built
from kiln.workspace import Workspace

MODEL = "lenet"


def cells(root: Path) -> list[tuple[str, Server, bench.Target]]:
    decl, dirs = declared.resolve(MODEL, [])
    first = payloads.first_payload(decl)
    body = (first.body, first.content_type)
    served = bench.kiln_serve_config(MODEL, dirs)
    kiln = bench.kiln_server(root / "kiln", MODEL, served, dirs)
    no_site = Server(dataclasses.replace(kiln.settings, run_dir=root / "no-site",
                                         ports=Ports.free(), internal_ports=Ports.free(),
                                         worker_site=False))
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

    return [("kiln front", kiln, target(FRONT, MODEL)),
            ("kiln front, no site", no_site, target(FRONT, MODEL)),
            ("kiln direct", kiln, target(DIRECT, MODEL)),
            ("plain best", plain, target(DIRECT, plain_name))]


def measure(cell, clients: int, seconds: int) -> tuple[float, float, dict[str, float]]:
    _, server, target = cell
    base, token = target.endpoint(server)
    procs = processes(server, nginx=target.via == FRONT)
    before = {k: cpu_seconds(v) for k, v in procs.items()}
    run = wrk.run(f"{base}/predictions/{target.model}", *target.payload, token, clients,
                  seconds)
    requests = max(1, run.requests)
    return run.throughput_rps, run.p50_ms, {k: (cpu_seconds(v) - before[k]) * 1e6 / requests
                                           for k, v in procs.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", default="16,32", help="wrk connections, a list (default 16,32)")
    p.add_argument("--rounds", type=int, default=4, help="turns of each cell (default 4)")
    p.add_argument("--seconds", type=int, default=5, help="each run (default 5)")
    opts = p.parse_args(argv)
    setup_logging()
    ensure_built(MODEL)
    runs = {}
    with tempfile.TemporaryDirectory(prefix="kiln-worker-io-") as root, \
            contextlib.ExitStack() as running:
        found = cells(Path(root))
        for server in dict.fromkeys(s for _, s, _ in found):
            running.enter_context(server.running(timeout=300))
        for cell in found:
            bench.check_answer(cell[2], cell[1])
            measure(cell, 32, 4)  # warm-up: the JVM compiles its hot paths
        for turn in range(opts.rounds):
            for clients in map(int, opts.clients.split(",")):
                for cell in found[::-1] if turn % 2 else found:
                    runs.setdefault((cell[0], clients), []).append(
                        measure(cell, clients, opts.seconds))
            print(f"round {turn + 1}: load average {psutil.getloadavg()[0]:.1f}", flush=True)
    for (name, clients), rows in runs.items():
        cpu = {k: statistics.median(r[2][k] for r in rows) for k in rows[0][2]}
        print(f"{name:<20}{clients:>3} clients {statistics.median(r[0] for r in rows):6.0f} "
              f"inputs/s {[round(r[0]) for r in rows]} p50 "
              f"{statistics.median(r[1] for r in rows):5.2f} ms CPU us/request "
              + ", ".join(f"{k} {v:.0f}" for k, v in cpu.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
