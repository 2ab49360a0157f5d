"""What TorchServe's stock log configuration costs, beside Kiln's own.

Runs the same closed-loop load against one model on a server with TorchServe's stock
log4j2.xml and then on one with deploy/log4j2.xml, and prints both with their ratio.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from kiln.console import setup_logging
from kiln.deploy.server import LOG_CONFIG, Ports, Server, ServerSettings
from kiln.loadtests import declared, payloads
from kiln.loadtests.batching import measure, print_table, register
from kiln.workspace import Workspace


def run(log_config: Path | None, model: str, payload: payloads.Payload, clients: int,
        seconds: float, label: str):
    with tempfile.TemporaryDirectory(prefix="kiln-logcost-") as run_dir:
        server = Server(ServerSettings(Path(run_dir), Workspace.current().model_store, [],
                                       Ports.free(), enable_model_api=True,
                                       log_config=log_config))
        server.start()
        try:
            server.wait_ready()
            name = f"{model}_{label}"
            register(server, model, name, 1, 0)
            return measure(server, name, 1, 0, clients, seconds, payload.body,
                           payload.content_type)
        finally:
            server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    declared.add_model_argument(parser)
    parser.add_argument("--clients", type=int, default=8, help="concurrency (default: 8)")
    parser.add_argument("--seconds", type=float, default=10,
                        help="measured seconds per server (default: 10)")
    args = parser.parse_args(argv)
    setup_logging()
    decl = declared.chosen(parser, args)
    payload = payloads.first_payload(decl)
    stock = run(None, decl.name, payload, args.clients, args.seconds, "stocklog")
    kiln = run(LOG_CONFIG, decl.name, payload, args.clients, args.seconds, "kilnlog")
    print_table([stock, kiln], base_rows=[stock])
    print(f"\nKiln's log configuration: {kiln.throughput_rps / stock.throughput_rps:.2f}x "
          f"the throughput of TorchServe's stock one")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
