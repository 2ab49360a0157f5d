"""kiln bench's observability pair, many times over, with the CPU of each serving process
(issue 19, goal 5): how far apart all on (at each of the pair's sample rates, 1% and 0.1%)
and all off are once a server's own speed is averaged out.

    python -m kiln.loadtests.studies.observability_pairs [--pairs 5] [--rounds 6] [--seconds 5]

Each pair is three fresh servers as kiln bench's pair has them (loadtests/observability.py:
lenet at the comparison configuration through Kiln's front, everything that watches off, and
all of it on at each sample rate), all warmed up for four rounds' worth of load at 32
clients, then taking turns under wrk, the order reversed every other round. Printed per pair
and on row: the throughput ratio (on to off, medians of the rounds), the p50 difference and
the CPU microseconds a request each row's workers, TorchServe's frontend, nginx and Kiln's
helpers (metrics exporter, proxy spans) spent, as differences; then the median of the pairs.
Two servers of one configuration differ for their whole life: by about 1% on a quiet machine
(three pairs of two "off" servers: 1.000 to 1.010x), by up to 4.6% on a busy one; the spread
of the pairs says how far any one is to be trusted.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from kiln.console import setup_logging
from kiln.deploy.server import Server
from kiln.loadtests import bench, declared, observability, payloads, wrk
from kiln.loadtests.studies.handler_cost import cpu_seconds, processes
from kiln.model_store.build import ensure_built

MODEL = "lenet"
CLIENTS = 32
PARTS = ("workers", "frontend", "nginx", "helpers")


def measure(target: bench.Target, server: Server, clients: int, seconds: int
            ) -> dict[str, float]:
    procs = processes(server, nginx=True)
    procs["helpers"] = observability.helper_processes(server)
    before = {k: cpu_seconds(v) for k, v in procs.items()}
    base, token = target.endpoint(server)
    run = wrk.run(f"{base}/predictions/{MODEL}", *target.payload, token, clients, seconds)
    if run.errors:
        raise RuntimeError(f"{target.name}: {run.errors} failed requests")
    requests = max(1, run.requests)
    return {"inputs/s": run.throughput_rps, "p50 ms": run.p50_ms,
            **{k: (cpu_seconds(v) - before[k]) * 1e6 / requests for k, v in procs.items()}}


def pair(index: int, root: Path, dirs: list[Path], sink: str, opts: argparse.Namespace
         ) -> dict[str, dict[str, float]]:
    """One pair's medians, for each on row: the ratio to the off row, the p50 difference and
    each part's CPU difference."""
    targets = bench.observability_targets(
        MODEL, payloads.first_payload(declared.resolve(MODEL, [])[0]))
    runs = bench.observability_pair(targets, index, CLIENTS, opts.seconds, root, dirs, sink,
                                    rounds=opts.rounds, measure=measure)
    med = {row: {k: statistics.median(r[k] for r in rows) for k in rows[0]}
           for row, rows in runs.items()}
    off = med[observability.OFF]
    return {row: {"x": med[row]["inputs/s"] / off["inputs/s"],
                  "p50 ms": med[row]["p50 ms"] - off["p50 ms"],
                  **{part: med[row][part] - off[part] for part in PARTS}}
            for row in observability.SAMPLES}


def line(name: str, sample: float, row: dict[str, float]) -> str:
    return (f"| {name} | {sample:.1%} | {row['x']:.3f} | {row['p50 ms']:+.2f} | "
            + " | ".join(f"{row[p]:+.1f}" for p in PARTS) + " |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=5, help="pairs of fresh servers (default 5)")
    p.add_argument("--rounds", type=int, default=6, help="turns of each server (default 6)")
    p.add_argument("--seconds", type=int, default=5, help="each turn (default 5)")
    opts = p.parse_args(argv)
    setup_logging()
    ensure_built(MODEL)
    dirs = declared.resolve(MODEL, [])[1]
    found = []
    print("| pair | sampled | on/off | p50 ms | " + " | ".join(f"{p} us/rq" for p in PARTS)
          + " |")
    print("|---:|---:|---:|---:|" + "---:|" * len(PARTS))
    with observability.otlp_sink() as sink, tempfile.TemporaryDirectory(
            prefix="kiln-obs-pairs-") as root:
        for i in range(opts.pairs):
            found.append(pair(i, Path(root), dirs, sink, opts))
            for row, sample in observability.SAMPLES.items():
                print(line(str(i + 1), sample, found[-1][row]), flush=True)
    for row, sample in observability.SAMPLES.items():
        med = {k: statistics.median(f[row][k] for f in found) for k in found[0][row]}
        print(line("median", sample, med))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
