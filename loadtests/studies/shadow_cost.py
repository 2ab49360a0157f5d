"""What a shadow costs the clients (issue 18): wrk on unpinned /predictions/lenet at 16
keep-alive connections, routed to 1.0, with lenet 2.0 shadowing none, a fifth, or all of the
requests, in turn, `--rounds` times each. A sampled REST request is mirrored by nginx to the
OIP plugin (deploy/nginx/nginx.conf), which answers at once and scores 1.0 and 2.0 again in
the background; nginx holds the next request on that connection until the mirror's answer.
2.0 here is 1.0's archive under another version: the cost is the same, the answers agree.

    python -m kiln.loadtests.studies.shadow_cost [--seconds 10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from kiln.deploy import lifecycle, routing
from kiln.deploy.server import Ports, Server, ServerSettings
from kiln.loadtests.studies.route_cost import median_line, run
from kiln.model_store import with_version
from kiln.model_store.build import ensure_built

MODEL = "lenet"
FRACTIONS = (0.0, 0.2, 1.0)


def register_second(server: Server, store: Path) -> None:
    """lenet's archive again as version 2.0 (NAME-2.0.mar), beside 1.0 with its batching."""
    second = with_version(store / f"{MODEL}.mar", store / f"{MODEL}-2.0.mar", "2.0")
    target = lifecycle.Target.of(server.run_dir, store)
    target.management.register(second.name, target.management.describe(MODEL, "1.0"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=10, help="each run (default 10)")
    p.add_argument("--rounds", type=int, default=3, help="runs of each fraction (default 3)")
    opts = p.parse_args(argv)
    archive = ensure_built(MODEL)
    results = {f: [] for f in FRACTIONS}
    with tempfile.TemporaryDirectory(prefix="kiln-shadow-cost-") as folder:
        store = Path(folder) / "store"
        store.mkdir()
        (store / f"{MODEL}.mar").write_bytes(Path(archive).read_bytes())
        server = Server(ServerSettings(Path(folder) / "run", store, [MODEL], Ports.free(),
                                       internal_ports=Ports.free(), enable_model_api=True,
                                       cores=2))
        with server.running(timeout=240):
            register_second(server, store)
            state = routing.state_file(server.run_dir)
            for _ in range(opts.rounds):
                for fraction in FRACTIONS:
                    shadows = {"2.0": fraction} if fraction else {}
                    state.write_text(json.dumps({MODEL: {"default": "1.0", "route": None,
                                                         "shadows": shadows}}))
                    results[fraction].append(run(server, f"/predictions/{MODEL}", opts.seconds))
                    print(fraction, "req/s, p50 ms, p99 ms, failed:", results[fraction][-1],
                          flush=True)
    for fraction, runs in results.items():
        print(median_line(f"shadow {fraction:g}", runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
