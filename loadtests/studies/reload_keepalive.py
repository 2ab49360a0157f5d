"""Does a front-proxy reload (what `kiln keys rotate` does: deploy/front.py's Front.reload)
drop kept-alive client connections? Issue 18 changes routes while clients keep their
connections open, so this decides whether a route change may reload nginx.

wrk keeps 16 connections busy on lenet while the proxy reloads every RELOAD_EVERY_S; wrk
counts non-2xx answers and socket errors (a read error is a connection reset or closed under
a request). Beside it, keep-alive clients of our own pausing PAUSE_S between requests (an
idle kept-alive connection is what a reload's old worker closes) count how often the server
closed the connection they held, and how often a request failed for it.

    python -m kiln.loadtests.studies.reload_keepalive [--seconds 20] [--reloads 8]
"""

from __future__ import annotations

import argparse
import http.client
import tempfile
import threading
import time
from pathlib import Path

from kiln.deploy.server import Ports, Server, ServerSettings
from kiln.loadtests.studies.reliability.load import Mix
from kiln.loadtests.studies.reliability.served import rest_payload
from kiln.model_store.build import ensure_built
from kiln.workspace import Workspace

MODEL = "lenet"
CLIENTS = 16
PAUSE_S = 0.02  # our own clients' pause: their connections sit idle between requests


class IdleClient(threading.Thread):
    """One kept-alive connection, a request every PAUSE_S; counts answers, failures (no
    answer on a connection that was open) and the connections the server closed."""

    def __init__(self, host: str, port: int, token: str):
        super().__init__(daemon=True)
        self.host, self.port = host, port
        payload = rest_payload(MODEL)
        self.body, self.headers = payload.body, {"Content-Type": payload.content_type,
                                                 "Authorization": f"Bearer {token}"}
        self.ok = self.failed = self.closed = 0
        self.halt = threading.Event()

    def run(self):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        while not self.halt.is_set():
            try:
                conn.request("POST", f"/predictions/{MODEL}", self.body, self.headers)
                r = conn.getresponse()
                r.read()
                self.ok += r.status == 200
                self.failed += r.status != 200
                if r.getheader("Connection", "").lower() == "close":
                    self.closed += 1
                    conn.close()
            except (OSError, http.client.HTTPException):
                self.failed += 1
                self.closed += 1
                conn.close()
            self.halt.wait(PAUSE_S)
        conn.close()


def measure(server: Server, seconds: float, reloads: int) -> dict:
    host, port = "127.0.0.1", server.settings.ports.inference
    token = server.keys()["inference"]
    payload = rest_payload(MODEL)
    idle = [IdleClient(host, port, token) for _ in range(4)]
    for c in idle:
        c.start()
    load = Mix(server.url("inference"), [(f"/predictions/{MODEL}", payload.body,
                                          payload.content_type)], token, CLIENTS, seconds)
    gap = seconds / (reloads + 2)
    time.sleep(gap)  # steady load first
    for _ in range(reloads):
        server.front.reload()
        time.sleep(gap)
    result = load.finish()
    for c in idle:
        c.halt.set()
        c.join(30)
    # wrk's socket errors here are reads: a connection closed or reset under a request.
    return {"reloads": reloads, "wrk_requests": result.run.requests,
            "wrk_statuses": dict(result.statuses), "wrk_socket_errors": result.socket_errors,
            "idle_ok": sum(c.ok for c in idle), "idle_failed": sum(c.failed for c in idle),
            "idle_closed_by_server": sum(c.closed for c in idle)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=20, help="load duration (default 20)")
    p.add_argument("--reloads", type=int, default=8, help="reloads during it (default 8)")
    opts = p.parse_args(argv)
    ensure_built(MODEL)
    with tempfile.TemporaryDirectory(prefix="kiln-reload-") as folder:
        server = Server(ServerSettings(Path(folder), Workspace.current().model_store, [MODEL],
                                       Ports.free(), internal_ports=Ports.free()))
        with server.running(timeout=240):
            for reloads in (0, opts.reloads):
                print(measure(server, opts.seconds, reloads), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
