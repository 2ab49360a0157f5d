"""What the payload log costs (issue 19): in-process, the handler's hook per request with the
log off, at 1% (unsampled requests, and the written ones amortised) and at 100%; then served,
wrk on /predictions/lenet at 16 keep-alive connections against three servers started side by
side (off, 0.01, 1.0), taking turns, `--rounds` times each.

    python -m kiln.loadtests.studies.payload_log_cost [--seconds 10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import tempfile
import timeit
from pathlib import Path

from prometheus_client import CollectorRegistry
from ts.context import Context, RequestProcessor

from kiln.deploy.server import Ports, Server, ServerSettings
from kiln.handlers import payload_log
from kiln.loadtests.studies.route_cost import median_line, run
from kiln.model_store.build import ensure_built
from kiln.workspace import Workspace

MODEL = "lenet"
FRACTIONS = (0.0, 0.01, 1.0)
SEVEN = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "digits" / "7.png"
ANSWER = ('{"label": "7", "probability": 0.9999638795852661, "top_k": [{"label": "7", '
          '"probability": 0.9999638795852661}, {"label": "3", "probability": 3.35e-05}, '
          '{"label": "2", "probability": 1.69e-06}]}')


def batch(size: int):
    """A batch of PNG requests as the worker hands it over, with the headers nginx sends."""
    context = Context(MODEL, "/nowhere", {"model": {"modelVersion": "1.0"}}, 1, None, "0.12.0")
    context.request_processor = [RequestProcessor({
        "Host": "127.0.0.1", "Content-Type": "image/png", "X-Request-ID": f"r{i}",
        "Authorization": "Bearer k"}) for i in range(size)]
    context.request_ids = {i: f"ts-{i}" for i in range(size)}
    return [{"body": bytearray(SEVEN.read_bytes())}] * size, [ANSWER] * size, context


def in_process(folder: str) -> None:
    def log(fraction, **draw):
        return payload_log.PayloadLog(payload_log.Store(folder), fraction, MODEL, "1.0",
                                      CollectorRegistry(), **draw)

    for size in (1, 16):
        data, answers, context = batch(size)
        cases = {"off": (payload_log.Off(), 20000),
                 "0.01, an unsampled request": (log(0.01, draw=lambda: 1 - 1e-15), 20000),
                 "0.01, records written amortised": (log(0.01), 20000),
                 "1.0, every record written": (log(1.0), 2000)}
        for name, (hook, number) in cases.items():
            call = functools.partial(hook.record, data, answers, context, 0.0)
            best = min(timeit.repeat(call, number=number, repeat=5)) / number
            print(f"batch {size:2d}  {name:32s} {1e9 * best / size:9.0f} ns per request")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=10, help="each run (default 10)")
    p.add_argument("--rounds", type=int, default=3, help="runs of each fraction (default 3)")
    opts = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kiln-payload-cost-") as folder:
        in_process(folder)
        ensure_built(MODEL)
        results = {f: [] for f in FRACTIONS}
        with contextlib.ExitStack() as stack:
            servers = {}
            for fraction in FRACTIONS:
                servers[fraction] = Server(ServerSettings(
                    Path(folder) / f"run-{fraction:g}", Workspace.current().model_store,
                    [MODEL], Ports.free(), internal_ports=Ports.free(), payload_log=fraction))
                stack.enter_context(servers[fraction].running(timeout=240))
            for _ in range(opts.rounds):
                for fraction, server in servers.items():
                    results[fraction].append(run(server, f"/predictions/{MODEL}", opts.seconds))
                    print(fraction, "req/s, p50 ms, p99 ms, failed:", results[fraction][-1],
                          flush=True)
    for fraction, runs in results.items():
        print(median_line(f"payload log {fraction:g}", runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
