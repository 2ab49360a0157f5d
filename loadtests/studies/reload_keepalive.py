"""Does a key rotation close kept-alive client connections? Until issue 18 `kiln keys rotate`
reloaded the front proxy (SIGHUP), and a reload's old worker closes its idle kept-alive
connections; now each nginx worker reads the keys again (deploy/nginx/kiln_keys.lua) and
nothing reloads. Issue 18 changes routes and keys while clients keep their connections open.

wrk keeps 16 connections busy on MODEL while the keys are rotated every so often (the old keys
kept for an hour, as `kiln keys rotate` does), on one server: without rotations, rotations as
they are now, and rotations each followed by the reload they used to do. wrk counts non-2xx
answers and socket errors (a read error is a connection reset or closed under a request).
Beside it, keep-alive clients of our own pausing PAUSE_S between requests (an idle kept-alive
connection is what a reload's old worker closes) count how often the server closed the
connection they held, and how often a request failed for it.

    python -m kiln.loadtests.studies.reload_keepalive [--seconds 20] [--rotations 8]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import signal
import tempfile
import threading
import time
from pathlib import Path

import psutil

from kiln.deploy import front
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


def rotate(server: Server, reload: bool) -> None:
    keys = front.rotate(front.read_keys(server.front.keys_file), time.time(), overlap_s=3600)
    server.front.apply(keys)
    if reload:
        reload_nginx(server.front)


def reload_nginx(run: front.Front, timeout: float = 5) -> None:
    """What a rotation did before issue 18: SIGHUP, then a wait until a worker started by it
    runs and every old one has exited or is shutting down."""
    master = psutil.Process(run.pid())
    before = {p.pid for p in master.children()}
    master.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        workers = {}
        for proc in master.children():
            with contextlib.suppress(psutil.Error):
                workers[proc.pid] = " ".join(proc.cmdline())
        old_serving = [p for p in before & set(workers) if "shutting down" not in workers[p]]
        if set(workers) - before and not old_serving:
            return
        time.sleep(0.01)
    raise RuntimeError(f"nginx did not reload within {timeout:g} s")


def nginx_pids(server: Server) -> tuple[int, list[int]]:
    master = server.front.pid()
    return master, sorted(p.pid for p in psutil.Process(master).children())


def measure(server: Server, seconds: float, rotations: int, reload: bool = False) -> dict:
    host, port = "127.0.0.1", server.settings.ports.inference
    token = server.keys()["inference"]
    payload = rest_payload(MODEL)
    pids = nginx_pids(server)
    idle = [IdleClient(host, port, token) for _ in range(4)]
    for c in idle:
        c.start()
    load = Mix(server.url("inference"), [(f"/predictions/{MODEL}", payload.body,
                                          payload.content_type)], token, CLIENTS, seconds)
    gap = seconds / (rotations + 2)
    time.sleep(gap)  # steady load first
    for _ in range(rotations):
        rotate(server, reload)
        time.sleep(gap)
    result = load.finish()
    for c in idle:
        c.halt.set()
        c.join(30)
    # wrk's socket errors here are reads: a connection closed or reset under a request.
    return {"rotations": rotations, "reload": reload, "wrk_requests": result.run.requests,
            "wrk_statuses": dict(result.statuses), "wrk_socket_errors": result.socket_errors,
            "idle_ok": sum(c.ok for c in idle), "idle_failed": sum(c.failed for c in idle),
            "idle_closed_by_server": sum(c.closed for c in idle),
            "nginx_pids_unchanged": nginx_pids(server) == pids}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=20, help="load duration (default 20)")
    p.add_argument("--rotations", type=int, default=8,
                   help="key rotations during it (default 8)")
    opts = p.parse_args(argv)
    ensure_built(MODEL)
    with tempfile.TemporaryDirectory(prefix="kiln-reload-") as folder:
        server = Server(ServerSettings(Path(folder), Workspace.current().model_store, [MODEL],
                                       Ports.free(), internal_ports=Ports.free()))
        with server.running(timeout=240):
            for rotations, reload in ((0, False), (opts.rotations, False),
                                      (opts.rotations, True)):
                print(measure(server, opts.seconds, rotations, reload), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
