"""What following a route costs an unpinned request (issue 18): wrk on lenet at 16 keep-alive
connections on one server, in turn, `--rounds` times each: /predictions/lenet/1.0 (pinned),
/predictions/lenet without a state file (nginx forwards it as it is), and /predictions/lenet
with a route (100% to 1.0) in the state file (nginx asks the OIP plugin which version, one
loopback request per prediction: deploy/nginx/nginx.conf), and /predictions/lenet/1.0 with
that file (nginx asks the plugin whether the file still records 1.0).

    python -m kiln.loadtests.studies.route_cost [--seconds 10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from kiln.deploy import routing
from kiln.deploy.server import Ports, Server, ServerSettings
from kiln.loadtests.studies.reliability.load import Mix
from kiln.loadtests.studies.reliability.served import rest_payload
from kiln.model_store.build import ensure_built
from kiln.workspace import Workspace

MODEL = "lenet"
CLIENTS = 16


def run(server: Server, path: str, seconds: float) -> tuple[float, float, float, int]:
    """(requests/s, p50 ms, p99 ms, failed) of wrk POSTing to `path`."""
    payload = rest_payload(MODEL)
    load = Mix(server.url("inference"), [(path, payload.body, payload.content_type)],
               server.keys()["inference"], CLIENTS, seconds).finish()
    return load.run.throughput_rps, load.run.p50_ms, load.run.p99_ms, load.failed


def set_route(state: Path, routed: bool) -> None:
    """A state file routing all of lenet to 1.0 (the lookup made on every request), or none
    (no lookup)."""
    if routed:
        state.write_text(json.dumps({MODEL: {"versions": {"1.0": {}}, "default": "1.0",
                                             "route": {"1.0": 100}}}))
    else:
        state.unlink(missing_ok=True)


def median_line(label: str, runs: list[tuple[float, float, float, int]]) -> str:
    """`label`'s medians over runs of run(): requests/s, p50, p99; the failed, summed."""
    return (f"{label}: median {statistics.median(r[0] for r in runs):.0f} req/s, "
            f"p50 {statistics.median(r[1] for r in runs):.2f} ms, "
            f"p99 {statistics.median(r[2] for r in runs):.2f} ms, "
            f"failed {sum(r[3] for r in runs)}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=10, help="each run (default 10)")
    p.add_argument("--rounds", type=int, default=3, help="runs of each path (default 3)")
    opts = p.parse_args(argv)
    ensure_built(MODEL)
    # name: (path, with a route in the state file)
    cases = {"pinned": (f"/predictions/{MODEL}/1.0", False),
             "unrouted": (f"/predictions/{MODEL}", False),
             "routed": (f"/predictions/{MODEL}", True),
             "pinned, checked": (f"/predictions/{MODEL}/1.0", True)}
    with tempfile.TemporaryDirectory(prefix="kiln-route-cost-") as folder:
        server = Server(ServerSettings(Path(folder), Workspace.current().model_store, [MODEL],
                                       Ports.free(), internal_ports=Ports.free()))
        with server.running(timeout=240):
            state = routing.state_file(server.run_dir)
            results = {name: [] for name in cases}
            for _ in range(opts.rounds):
                for name, (path, routed) in cases.items():
                    set_route(state, routed)
                    results[name].append(run(server, path, opts.seconds))
                    print(name, "req/s, p50 ms, p99 ms, failed:", results[name][-1], flush=True)
    rps = {name: statistics.median(r[0] for r in runs) for name, runs in results.items()}
    p50 = {name: statistics.median(r[1] for r in runs) for name, runs in results.items()}
    for name in cases:
        print(f"{name}: median {rps[name]:.0f} req/s ({rps[name] / rps['pinned']:.3f} of "
              f"pinned), median p50 {p50[name]:.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
