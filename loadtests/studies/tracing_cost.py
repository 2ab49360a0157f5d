"""What following each request costs (issue 19, goal 1): wrk on /predictions/lenet at 16
keep-alive connections through the front proxy, against two servers side by side, in turns,
`--rounds` times each: one with the access log and OTLP spans off, one with the access log
only, one with both on and every trace sampled, one with 1% of them sampled (spans to a local
sink that reads and drops them). The request id, traceparent and Server-Timing are always on,
in all four.

    python -m kiln.loadtests.studies.tracing_cost [--seconds 10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
from pathlib import Path

from kiln.deploy.server import Ports, Server, ServerSettings
from kiln.loadtests.observability import otlp_sink
from kiln.loadtests.observability import serving_cpu_seconds as cpu_s
from kiln.loadtests.studies.route_cost import MODEL, run
from kiln.model_store.build import ensure_built
from kiln.workspace import Workspace


def server(folder: Path, name: str, **tracing) -> Server:
    return Server(ServerSettings(folder / name, Workspace.current().model_store, [MODEL],
                                 Ports.free(), internal_ports=Ports.free(), cores=2, **tracing))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=10, help="each run (default 10)")
    p.add_argument("--rounds", type=int, default=3, help="runs of each server (default 3)")
    opts = p.parse_args(argv)
    ensure_built(MODEL)
    results = {"tracing off": [], "access log": [], "tracing on": [], "tracing on, 1%": []}
    with otlp_sink() as sink, tempfile.TemporaryDirectory(prefix="kiln-tracing-cost-") as folder:
        servers = {"tracing off": server(Path(folder), "off"),
                   "access log": server(Path(folder), "log", access_log=True),
                   "tracing on": server(Path(folder), "on", access_log=True,
                                        otlp_endpoint=sink),
                   "tracing on, 1%": server(Path(folder), "on1", access_log=True,
                                            otlp_endpoint=sink,
                                            trace_sample=0.01)}
        with contextlib.ExitStack() as running:
            for srv in servers.values():
                running.enter_context(srv.running(timeout=240))
            for _ in range(opts.rounds):
                for name, srv in servers.items():
                    before = cpu_s(srv)
                    rps, p50, p99, failed = run(srv, f"/predictions/{MODEL}", opts.seconds)
                    cpu_ms = (cpu_s(srv) - before) * 1000 / max(1.0, rps * opts.seconds)
                    results[name].append((rps, p50, p99, failed, cpu_ms))
                    print(name, "req/s, p50 ms, p99 ms, failed, server CPU ms/request:",
                          results[name][-1], flush=True)
    off = statistics.median(r[0] for r in results["tracing off"])
    for name, runs in results.items():
        rps = statistics.median(r[0] for r in runs)
        print(f"{name}: median {rps:.0f} req/s ({rps / off:.3f} of off), "
              f"p50 {statistics.median(r[1] for r in runs):.2f} ms, "
              f"p99 {statistics.median(r[2] for r in runs):.2f} ms, "
              f"failed {sum(r[3] for r in runs)}, "
              f"server CPU {statistics.median(r[4] for r in runs):.2f} ms a request")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
