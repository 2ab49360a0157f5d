"""What any front proxy costs at the top, and how much of it is Kiln's: lenet served five ways,
all up, taking turns under wrk (issue 21, part 1).

    python -m kiln.loadtests.studies.front_floor [--clients 16,32] [--rounds 4] [--seconds 5]

- plain best: loadtests/plain_handler.py at bench.PLAIN_BEST_CONFIG on TorchServe as released,
  straight to its port (kiln bench's "plain best");
- plain best, bare proxy: the same TorchServe behind the cheapest nginx that forwards at all
  (one worker, kept-alive upstream connections, no access log, no key check, no header of its
  own: loadtests/bare_proxy.py);
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

Two runs on the quiet 2-core machine (load average 3 to 5, the study's own servers and wrk),
lenet as served at w2 b8 d1; inputs/s as a ratio to plain best and server CPU us a request
(workers + JVM + proxy), each run's medians of 4 and 5 rounds of 5 s:

| cell | x best, 16 | x best, 32 | server us/rq, 16 | server us/rq, 32 | proxy us/rq |
|---|---|---|---|---|---|
| plain best | 1, 1 | 1, 1 | 310, 302 | 290, 286 | |
| plain best, bare proxy | 0.800, 0.856 | 0.915, 0.964 | 377, 340 | 323, 306 | 27 to 30 |
| kiln as served | 0.686, 0.729 | 0.822, 0.904 | 440, 401 | 348, 319 | 48 to 60 |
| kiln, bare proxy | 0.733, 0.793 | 0.954, 0.965 | 396, 350 | 299, 291 | 27 to 35 |
| kiln direct | 0.919, 0.945 | 1.010, 1.048 | 324, 298 | 276, 262 | |

A hop through the least nginx costs plain best itself 14 to 20% of its throughput at 16
clients and 4 to 9% at 32: its own 27 to 30 us a request, and at 16 clients fuller queues are
rarer behind it, so the workers and the JVM spend more a request too. No front that is a
process of its own reaches 1.0x of plain best straight to TorchServe unless what stands behind
it is cheaper than plain best by more than the hop; Kiln's own front work (the key check, the
request id and trace context, the route and path checks) costs nginx another 18 to 25 us
(kiln bench's second run: 29).
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
from kiln.deploy.server import Server
from kiln.loadtests import bench, declared, payloads, stock, wrk
from kiln.loadtests.bare_proxy import BareProxy
from kiln.loadtests.bench_table import BARE, DIRECT, FRONT
from kiln.loadtests.studies.handler_cost import cpu_seconds, processes
from kiln.model_store.build import ensure_built
from kiln.workspace import Workspace

MODEL = "lenet"


def kiln_and_plain(root: Path):
    """Kiln as `kiln serve lenet` runs it and plain best, not started; the plain archive's
    name; and a Target maker for lenet's first example: target(cell name, via, model)."""
    decl, dirs = declared.resolve(MODEL, [])
    first = payloads.first_payload(decl)
    body = (first.body, first.content_type)
    kiln = bench.kiln_server(root / "kiln", MODEL, bench.kiln_serve_config(MODEL, dirs), dirs)
    store = root / "store"
    store.mkdir()
    plain_name = stock.build_plain(MODEL, decl.version, Workspace.current().exports(MODEL),
                                   store)

    def target(name, via, model):
        return bench.Target(name, via, "", model, body, first.label)

    return kiln, bench.plain_best_server(root / "plain", store, plain_name), plain_name, target


def cells(root: Path) -> list[tuple[Server, bench.Target]]:
    """The five ways in; the two through the bare proxy get theirs in take_turns, once their
    server is up (the proxy adds TorchServe's token)."""
    kiln, plain, plain_name, target = kiln_and_plain(root)
    return [(plain, target("plain best", DIRECT, plain_name)),
            (plain, target("plain best, bare proxy", BARE, plain_name)),
            (kiln, target("kiln as served", FRONT, MODEL)),
            (kiln, target("kiln, bare proxy", BARE, MODEL)),
            (kiln, target("kiln direct", DIRECT, MODEL))]


def measure(server: Server, target: bench.Target, clients: int, seconds: int
            ) -> dict[str, float]:
    base, token = target.endpoint(server)
    procs = processes(server, nginx=target.via == FRONT)
    if target.proxy is not None:
        procs["nginx"] = target.proxy.processes()
    before = {k: cpu_seconds(v) for k, v in procs.items()}
    run = wrk.run(f"{base}/predictions/{target.model}", *target.payload, token, clients,
                  seconds)
    if run.errors:
        raise RuntimeError(f"{target.name}, {clients} clients: {run.errors} failed requests")
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


def arguments(doc: str, argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--clients", default="16,32", help="wrk connections, a list (default 16,32)")
    p.add_argument("--rounds", type=int, default=4, help="turns of each cell (default 4)")
    p.add_argument("--seconds", type=int, default=5, help="each run (default 5)")
    return p.parse_args(argv)


def take_turns(root: Path, found: list[tuple[Server, bench.Target]],
               opts: argparse.Namespace) -> dict[tuple[str, int], list[dict[str, float]]]:
    """Every server up and every cell checked, then each cell at each --clients in every
    round, the order reversed every other round: {(cell, clients): a measure() a round}. A
    cell via BARE gets its bare proxy here, once its server is up."""
    runs: dict[tuple[str, int], list[dict[str, float]]] = {}
    with contextlib.ExitStack() as running:
        for server in dict.fromkeys(server for server, _ in found):
            running.enter_context(server.running(timeout=300))
        for i, (server, target) in enumerate(found):
            if target.via == BARE:
                proxy = running.enter_context(BareProxy(
                    root / f"bare-{i}", *dataclasses.replace(
                        target, via=DIRECT).endpoint(server)))
                found[i] = (server, dataclasses.replace(target, proxy=proxy))
        for server, target in found:
            bench.check_answer(target, server)
            measure(server, target, 32, 4)  # warm-up: the JVM compiles its hot paths
        for turn in range(opts.rounds):
            for clients in map(int, opts.clients.split(",")):
                for server, target in found[::-1] if turn % 2 else found:
                    runs.setdefault((target.name, clients), []).append(
                        measure(server, target, clients, opts.seconds))
            print(f"round {turn + 1}: load average {psutil.getloadavg()[0]:.1f}", flush=True)
    return runs


def main(argv: list[str] | None = None) -> int:
    opts = arguments(__doc__, argv)
    setup_logging()
    ensure_built(MODEL)
    with tempfile.TemporaryDirectory(prefix="kiln-front-floor-") as root:
        runs = take_turns(Path(root), cells(Path(root)), opts)
    print("\n".join(table(runs)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
