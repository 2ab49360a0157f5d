"""Memory of a served set, per process: `python -m kiln.loadtests.studies.memory [MODEL ...]`.

Starts TorchServe with the models (default: the default set) on free loopback ports, waits
until every model is ready, and prints RSS, PSS and USS of the frontend (the JVM), of each
worker and of the front proxy. RSS counts shared libraries in full in every process that maps
them, so it overstates a set of workers; PSS splits each shared page among its sharers and
adds up to what the set really costs. --eager-torch serves the same models once more with
torch imported at worker start, as TorchServe's own worker does, for the difference.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import psutil

from kiln import declaration
from kiln.console import setup_logging
from kiln.deploy.server import WORKER_SITE, Ports, Server, ServerSettings
from kiln.loadtests.studies.reliability.served import worker_pids
from kiln.loadtests.studies.reliability.soak import pss_mb
from kiln.workspace import Workspace

log = logging.getLogger("kiln.memory")
MB = 1024 * 1024


@dataclass
class Usage:
    process: str
    pid: int
    rss_mb: float
    pss_mb: float | None
    uss_mb: float | None


def usage(process: str, pid: int) -> Usage | None:
    try:
        info = psutil.Process(pid).memory_full_info()
    except psutil.AccessDenied:
        info = psutil.Process(pid).memory_info()
    except psutil.Error:
        return None
    uss = getattr(info, "uss", None)
    return Usage(process, pid, info.rss / MB, pss_mb(pid), None if uss is None else uss / MB)


def measure(server: Server) -> list[Usage]:
    """The frontend, each model's workers, the front proxy's processes, as they are now."""
    found = [usage("frontend (JVM)", server.pid())]
    for name in server.settings.models:
        found += [usage(f"worker {name}", pid) for pid, _ in worker_pids(server, name)
                  if pid > 0]
    nginx = server.front.pid()
    if nginx is not None:
        with contextlib.suppress(psutil.Error):
            master = psutil.Process(nginx)
            found += [usage("front proxy (nginx)", p.pid)
                      for p in [master, *master.children()]]
    return [u for u in found if u is not None]


def table(rows: list[Usage], title: str) -> str:
    def mb(x):
        return "   n/a" if x is None else f"{x:6.0f}"

    lines = [title, f"{'process':<24} {'pid':>8} {'RSS MB':>7} {'PSS MB':>7} {'USS MB':>7}"]
    lines += [f"{u.process:<24} {u.pid:>8} {mb(u.rss_mb):>7} {mb(u.pss_mb):>7} "
              f"{mb(u.uss_mb):>7}" for u in rows]
    pss = [u.pss_mb for u in rows]
    lines.append(f"{'total':<24} {'':>8} {mb(sum(u.rss_mb for u in rows)):>7} "
                 f"{mb(None if None in pss else sum(pss)):>7}")
    workers = [u for u in rows if u.process.startswith("worker ")]
    if workers and None not in (w.pss_mb for w in workers):
        lines.append(f"{'per worker (mean)':<24} {'':>8} "
                     f"{mb(sum(w.rss_mb for w in workers) / len(workers)):>7} "
                     f"{mb(sum(w.pss_mb for w in workers) / len(workers)):>7}")
    return "\n".join(lines)


class EagerTorchServer(Server):
    """Workers as TorchServe starts them by itself: torch imported at start."""

    def _env(self) -> dict[str, str]:
        env = super()._env()
        paths = [p for p in env["PYTHONPATH"].split(os.pathsep) if p != str(WORKER_SITE)]
        env["PYTHONPATH"] = os.pathsep.join(paths)
        return env


def served(models: list[str], server_class: type[Server], run_dir: Path) -> list[Usage]:
    server = server_class(ServerSettings(run_dir, Workspace.current().model_store, models,
                                         Ports.free(), internal_ports=Ports.free()))
    with server.running(timeout=240):
        return measure(server)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="models to serve (default: the default set)")
    parser.add_argument("--eager-torch", action="store_true",
                        help="also measure workers that import torch at start (default: off)")
    args = parser.parse_args(argv)
    setup_logging()
    models = args.models or declaration.default_set()
    variants = [("torch on first use (kiln serve)", Server)]
    if args.eager_torch:
        variants.append(("torch at worker start (TorchServe's own)", EagerTorchServer))
    for title, server_class in variants:
        with tempfile.TemporaryDirectory(prefix="kiln-memory-") as run_dir:
            print(table(served(models, server_class, Path(run_dir)), title) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
