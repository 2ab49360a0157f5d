"""What Kiln's gRPC server in the plugin (versions: routes, shadows, the version in each
answer's metadata) costs a call beside TorchServe's own gRPC port (issue 18): on one server,
behind the front proxy, `--clients` gRPC channels send lenet's example for `--seconds`, in
turn, `--rounds` times: to TorchServe's own port, to the plugin's port without a state file
and with a route (100% to 1.0), and to the front proxy's public port (which forwards to the
plugin's).

    python -m kiln.loadtests.studies.grpc_cost [--seconds 10] [--rounds 3] [--clients 8]

The clients are Python threads (one GIL): a figure to compare the ports with, not the
server's capacity.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from kiln import declaration
from kiln.client import encode_file
from kiln.deploy import routing
from kiln.deploy.server import HOST, Ports, Server, ServerSettings
from kiln.grpc_client import GrpcClient
from kiln.loadtests.studies.route_cost import set_route
from kiln.model_store.build import ensure_built
from kiln.workspace import Workspace

MODEL = "lenet"
WARM_S = 3


def run(target: str, token: str, body: tuple[bytes, str], clients: int,
        seconds: float) -> tuple[float, float, float, int]:
    """(calls/s, p50 ms, p99 ms, failed) of `clients` channels calling `target`."""
    times: list[float] = []
    failed = [0]
    end = time.monotonic() + seconds

    def call() -> None:
        with GrpcClient(target, token) as rpc:
            while time.monotonic() < end:
                start = time.monotonic()
                ok = rpc.predict(MODEL, *body).ok
                times.append(time.monotonic() - start)
                failed[0] += not ok

    threads = [threading.Thread(target=call) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ms = np.array(times) * 1e3
    return (len(times) / seconds, float(np.percentile(ms, 50)), float(np.percentile(ms, 99)),
            failed[0])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=10, help="each run (default 10)")
    p.add_argument("--rounds", type=int, default=3, help="runs of each port (default 3)")
    p.add_argument("--clients", type=int, default=8, help="gRPC channels (default 8)")
    opts = p.parse_args(argv)
    ensure_built(MODEL)
    body = encode_file(declaration.get(MODEL).examples[0].file)
    with tempfile.TemporaryDirectory(prefix="kiln-grpc-cost-") as folder:
        server = Server(ServerSettings(Path(folder), Workspace.current().model_store, [MODEL],
                                       Ports.free(), internal_ports=Ports.free()))
        with server.running(timeout=240):
            internal, own = server.settings.internal_ports, server.torchserve_keys()["inference"]
            # name: (target, token, with a route in the state file)
            cases = {"TorchServe's port": (f"{HOST}:{internal.grpc_inference}", own, False),
                     "plugin's port": (f"{HOST}:{internal.kiln_grpc}", own, False),
                     "plugin's port, routed": (f"{HOST}:{internal.kiln_grpc}", own, True),
                     "front proxy, routed": (f"{HOST}:{server.ports.grpc_inference}",
                                             server.keys()["inference"], True)}
            state = routing.state_file(server.run_dir)
            # Channels, the JIT and the workers warmed first: the first run of a fresh server
            # is several times slower than the next (84 calls/s, p99 3.4 s, here).
            for target, token, _ in cases.values():
                run(target, token, body, opts.clients, WARM_S)
            results = {name: [] for name in cases}
            for _ in range(opts.rounds):
                for name, (target, token, routed) in cases.items():
                    set_route(state, routed)
                    results[name].append(run(target, token, body, opts.clients, opts.seconds))
                    print(name, "calls/s, p50 ms, p99 ms, failed:",
                          tuple(round(x, 1) for x in results[name][-1]), flush=True)
    base = statistics.median(r[0] for r in results["TorchServe's port"])
    for name, runs in results.items():
        rps = statistics.median(r[0] for r in runs)
        print(f"{name}: median {rps:.0f} calls/s ({rps / base:.3f} of TorchServe's port), "
              f"median p50 {statistics.median(r[1] for r in runs):.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
