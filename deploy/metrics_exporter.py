"""Kiln's metrics exporter: the handlers' metrics of every worker, as one Prometheus page.

    python -m kiln.deploy.metrics_exporter --dir DIR --socket PATH [--versions FILE]

Workers record into memory-mapped files in DIR (prometheus-client's multiprocess mode;
Server._env gives them PROMETHEUS_MULTIPROC_DIR). TorchServe's plugin manager loads no
metrics endpoint, so this small process serves them: GET /metrics on a Unix socket, which
the front proxy appends to TorchServe's own page on the public metrics port (one scrape
target holds both; docs/deploy.md). A socket needs no port of its own, its path is known
before nginx's configuration is written, and nothing but the proxy can reach it.

With --versions (the run folder's versions.json, deploy/versions.py) the page also says each
model's default version (DEFAULT_VERSION_METRIC), so that an alert rule can tell a canary from
the default (deploy/prometheus/alerts.yml); the file is read at each scrape.

`Exporter` starts it detached (deploy/detached.py, as nginx's supervisor is), keeps its pid in
the run folder, and stops it; `kiln serve`, `kiln stop` and kiln-container do so through Server.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import socketserver
import sys
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import psutil
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from kiln.deploy import versions
from kiln.deploy.detached import (  # noqa: F401 (MAX_SOCKET_PATH: what its tests check)
    MAX_SOCKET_PATH,
    Detached,
    check_socket_path,
    serve_until_signalled,
    unix_accepts,
)
from kiln.handlers.metrics import MODEL_LABEL, VERSION_LABEL

log = logging.getLogger("kiln.metrics_exporter")

METRICS_PATH = "/metrics"
# prometheus-client's files: <type>[_<gauge mode>]_<pid>.db
PID_IN_FILE = re.compile(r"_(\d+)\.db$")
DEFAULT_VERSION_METRIC = "kiln_version_default"


class ExporterError(RuntimeError):
    pass


# -- the exporter process -------------------------------------------------------------------------
class Collector:
    """Reads DIR at each scrape; marks each worker gone since the last (a restarted worker's
    live gauges must not be summed with the running ones')."""

    def __init__(self, folder: Path, versions_file: Path | None = None):
        self.folder = folder
        self.registry = CollectorRegistry()
        MultiProcessCollector(self.registry, path=str(folder))
        if versions_file is not None:
            self.registry.register(DefaultVersions(versions_file))
        self.marked: set[int] = set()

    def dead_pids(self) -> set[int]:
        pids = set()
        for path in self.folder.glob("*.db"):
            match = PID_IN_FILE.search(path.name)
            if match:
                pids.add(int(match.group(1)))
        return {pid for pid in pids - self.marked if not psutil.pid_exists(pid)}

    def page(self) -> bytes:
        for pid in self.dead_pids():
            mark_process_dead(pid, str(self.folder))
            self.marked.add(pid)
        return generate_latest(self.registry)


class DefaultVersions:
    """DEFAULT_VERSION_METRIC: 1 for each model's default version in versions.json, nothing
    without the file (it is written atomically: never read half written)."""

    def __init__(self, path: Path):
        self.path = path

    def collect(self):
        family = GaugeMetricFamily(DEFAULT_VERSION_METRIC, "1 for the version a model's "
                                   "unpinned requests go to without a route (versions.json)",
                                   labels=[MODEL_LABEL, VERSION_LABEL])
        try:
            state = json.loads(self.path.read_text())
        except FileNotFoundError:
            state = {}
        for name, entry in state.items():
            family.add_metric([name, str(entry["default"])], 1)
        yield family


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self):  # noqa: N802 (http.server's name)
        if self.path.split("?", 1)[0] != METRICS_PATH:
            self.send_error(404)
            return
        try:
            body = self.server.collector.page()
        except Exception:  # a half-written file of a worker starting: the next scrape reads it
            log.exception("could not read %s", self.server.collector.folder)
            self.send_error(500)
            return
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE_LATEST)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def address_string(self):  # a Unix socket's peer has no address
        return "unix"

    def log_message(self, format, *args):  # noqa: A002 (no access log: nginx's is off too)
        pass


class _Server(socketserver.UnixStreamServer):
    def __init__(self, path: Path, collector: Collector):
        self.collector = collector
        path.unlink(missing_ok=True)  # a socket file a killed exporter left
        super().__init__(str(path), _Handler)


def serve(folder: Path, socket_path: Path, versions_file: Path | None = None) -> None:
    """Serves until SIGTERM or SIGINT."""
    server = _Server(socket_path, Collector(folder, versions_file))
    log.info("serving %s on %s", folder, socket_path)
    serve_until_signalled(server, socket_path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", type=Path, required=True, help="the workers' multiprocess folder")
    p.add_argument("--socket", type=Path, required=True, help="the Unix socket to serve on")
    p.add_argument("--versions", type=Path, help="versions.json, whose default versions it "
                   "exports (default: none)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    serve(args.dir, args.socket, args.versions)
    return 0


# -- its lifecycle --------------------------------------------------------------------------------
class Exporter:
    """The exporter of one run folder: its multiprocess folder, socket, pid file and log."""

    def __init__(self, run_dir: Path, versions_file: Path | None = None):
        self.run_dir = run_dir
        self.versions_file = versions_file or versions.state_file(run_dir).resolve()
        self.folder = run_dir / "kiln-metrics"
        self.socket = run_dir / "kiln-metrics.sock"
        self.process = Detached("Kiln's metrics exporter", run_dir / "kiln-metrics.pid",
                                run_dir / "kiln-metrics.log", str(self.socket), ExporterError)

    def pid(self) -> int | None:
        return self.process.pid()

    def start(self, timeout: float = 10, console: bool = False) -> None:
        """A fresh (emptied) folder and the exporter on it, answering when this returns.
        `console`: its log on this process's stderr rather than in the run folder."""
        check_socket_path(self.socket, ExporterError)
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)
        command = [sys.executable, "-m", "kiln.deploy.metrics_exporter",
                   "--dir", str(self.folder), "--socket", str(self.socket),
                   "--versions", str(self.versions_file)]
        self.process.start(command, lambda: unix_accepts(self.socket), timeout, console)

    def stop(self, timeout: float = 5) -> bool:
        """SIGTERM, killed after `timeout`; False when none ran."""
        if not self.process.stop(timeout):
            return False
        self.socket.unlink(missing_ok=True)
        return True

    def log_tail(self, lines: int = 20) -> str:
        return self.process.log_tail(lines)


if __name__ == "__main__":
    raise SystemExit(main())
