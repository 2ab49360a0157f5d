"""The command: the parts in order against a server started for it, or kiln serve's."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import tempfile
from pathlib import Path

from kiln import declaration
from kiln.console import setup_logging
from kiln.deploy.server import INTERNAL_PORTS_FILE, Ports, Server, ServerSettings
from kiln.loadtests import wrk
from kiln.loadtests.studies import oip_flood, reliability
from kiln.loadtests.studies.reliability.amplification import amplification_part
from kiln.loadtests.studies.reliability.kill import kill_part
from kiln.loadtests.studies.reliability.report import Report, write
from kiln.loadtests.studies.reliability.served import (
    Models,
    SetupError,
)
from kiln.loadtests.studies.reliability.slow import slow_part
from kiln.loadtests.studies.reliability.soak import soak_part
from kiln.loadtests.studies.reliability.table import Row, format_table
from kiln.workspace import Workspace

log = logging.getLogger("kiln.reliability")

PARTS = ("kill", "slow", "amplification", "soak", "thin", "oip_flood", "front_kill")


def measure(server: Server, opts: argparse.Namespace) -> Report:
    """The parts in opts.parts against a running `server`, in order."""
    models = Models.of(server)
    report = Report()
    if "kill" in opts.parts:
        rows, report.kill_timeline = kill_part(server, models, opts)
        report.rows += rows
    if "slow" in opts.parts:
        report.rows += slow_part(server, models, opts)
    if "amplification" in opts.parts:
        report.rows += amplification_part(server, models, opts)
    if "soak" in opts.parts:
        rows, report.memory = soak_part(server, models, opts)
        report.rows += rows
    if "thin" in opts.parts:
        # It builds on this package's clients and rows.
        from kiln.loadtests.studies import thin_images

        report.rows += thin_images.thin_part(server, models, opts)
    if "oip_flood" in opts.parts:
        flooded = oip_flood.flood(server, models.image[0], opts.clients, opts.load_seconds)
        report.rows += [Row(*row) for row in flooded.rows()]
    if "front_kill" in opts.parts:  # last: it resets every connection the proxy holds
        # It builds on this package's clients and rows.
        from kiln.loadtests.studies import front_kill

        report.rows += front_kill.front_kill_part(server, models, opts)
    return report


@contextlib.contextmanager
def own_server(folder: Path):
    """Kiln's default set, built where missing, served as kiln serve serves it: the front
    proxy on free public ports, TorchServe behind it on free ones of its own."""
    from kiln.model_store.build import ensure_built

    models = declaration.default_set()
    for name in models:
        ensure_built(name)
    server = Server(ServerSettings(folder, Workspace.current().model_store, models, Ports.free(),
                                   internal_ports=Ports.free()))
    with server.running(timeout=240):
        yield server


def attached(run_dir: Path) -> Server:
    """The server `kiln serve` runs from `run_dir`, with its front proxy if it has one."""
    ports = Ports.saved(run_dir)
    server = Server(ServerSettings(run_dir, Workspace.current().model_store, [], ports or Ports(),
                                   internal_ports=Ports.saved(run_dir, INTERNAL_PORTS_FILE)))
    if ports is None or server.pid() is None:
        raise SetupError(f"no TorchServe runs from {run_dir}: start one with kiln serve")
    return server


def add_arguments(p: argparse.ArgumentParser) -> None:
    def numbers(text: str) -> list[int]:
        return [int(n) for n in text.split(",")]

    p.add_argument("--parts", type=lambda t: t.split(","), default=list(PARTS),
                   help=f"parts to run, in order (default: {','.join(PARTS)})")
    p.add_argument("--load-seconds", type=float, default=20,
                   help="kill: seconds of load; the kill lands at a third (default: 20)")
    p.add_argument("--clients", type=int, default=8,
                   help="connections of the kill and soak loads (wrk) and good clients of "
                        "the slow part (default: 8)")
    p.add_argument("--slow", type=numbers, default=[64, 256],
                   help="slow connections held, a list (default: 64,256)")
    p.add_argument("--cell-seconds", type=float, default=5,
                   help="slow: seconds of good requests per cell (default: 5)")
    p.add_argument("--repeat", type=int, default=5,
                   help="amplification: calls of each request, the median counts (default: 5)")
    p.add_argument("--soak-seconds", type=float, default=600,
                   help="soak: seconds of mixed load (default: 600)")
    p.add_argument("--sample-seconds", type=float, default=5,
                   help="soak: seconds between memory samples (default: 5)")
    p.add_argument("--run-dir", type=Path,
                   help="measure the TorchServe kiln serve runs from here (default: start one "
                        "on free ports and stop it after)")
    p.add_argument("--out", type=Path,
                   help="folder for reliability.json and reliability.html (default: none)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m kiln.loadtests.studies.reliability",
                                     description=reliability.__doc__.splitlines()[0])
    add_arguments(parser)
    opts = parser.parse_args(argv)
    if unknown := set(opts.parts) - set(PARTS):
        parser.error(f"unknown part(s) {', '.join(sorted(unknown))}: use {','.join(PARTS)}")
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    setup_logging()
    if not wrk.available():
        log.error("wrk is not installed: apt-get install wrk")
        return 1
    try:
        with tempfile.TemporaryDirectory(prefix="kiln-reliability-") as tmp:
            with (contextlib.nullcontext(attached(opts.run_dir)) if opts.run_dir
                  else own_server(Path(tmp))) as server:
                report = measure(server, opts)
    except SetupError as err:
        log.error("%s", err)
        return 1
    print(f"reliability on {os.cpu_count()} cores; load generator: {wrk.NAME}")
    print(format_table(report.rows))
    if opts.out:
        write(report, opts, opts.out)
        print(f"wrote {opts.out / 'reliability.json'} and {opts.out / 'reliability.html'}")
    return 0

