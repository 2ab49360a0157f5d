"""Part 2: slow clients holding connections while good clients call."""

from __future__ import annotations

import functools
import logging
import select
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.client import HTTPConnection
from urllib.parse import urlsplit

import numpy as np

from kiln.deploy.server import Server
from kiln.loadtests import payloads
from kiln.loadtests.studies.reliability.served import (
    Models,
    oip_payload,
    rest_payload,
)
from kiln.loadtests.studies.reliability.table import Row, statuses_text

log = logging.getLogger("kiln.reliability")

# A good request unanswered this long while slow connections are held counts as failed: far
# above its p99 on an idle server, far below TorchServe's own response timeout (minutes).
GOOD_TIMEOUT_S = 2


class SlowClients:
    """`n` connections that send a request line, then one header byte a second, and never end
    their headers. held(): how many the server has neither closed nor answered."""

    def __init__(self, base_url: str, path: str, n: int):
        self.address = urlsplit(base_url)
        self.path, self.n = path, n
        self.sockets: list[socket.socket] = []
        self.refused = 0
        self.dropped: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._trickle, daemon=True)

    def __enter__(self) -> SlowClients:
        head = (f"POST {self.path} HTTP/1.1\r\nHost: {self.address.netloc}\r\n"
                "Content-Type: application/json\r\nX-Slow: ").encode()
        for _ in range(self.n):
            try:
                s = socket.create_connection((self.address.hostname, self.address.port), 5)
                s.sendall(head)
                self.sockets.append(s)
            except OSError:
                self.refused += 1
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        for s in self.sockets:
            s.close()

    def _trickle(self):
        poller = select.poll()
        for s in self.sockets:
            poller.register(s, select.POLLIN)
        while not self._stop.wait(1.0):
            # Readable: the server answered (an error, a timeout) or closed the connection.
            for fd, _ in poller.poll(0):
                self.dropped.add(fd)
                poller.unregister(fd)
            for s in self.sockets:
                if s.fileno() in self.dropped:
                    continue
                try:
                    s.send(b"a")
                except OSError:
                    self.dropped.add(s.fileno())
                    poller.unregister(s)

    def held(self) -> int:
        return len(self.sockets) - len(self.dropped)


@dataclass
class Good:
    """What the good clients of one cell got: ms of each 200, the rest by status."""

    ms: list[float]
    failed: Counter  # by status; 0: no answer within GOOD_TIMEOUT_S, or the connection broke
    seconds: float
    client_cpu_pct: float  # this process's, the slow connections' trickle included

    def percentile(self, q: float) -> float | None:
        return float(np.percentile(self.ms, q)) if self.ms else None


def good_requests(base_url: str, path: str, payload: payloads.Payload, token: str,
                  clients: int, seconds: float) -> Good:
    """`clients` keep-alive connections, each sending the next request when the last was
    answered or timed out; every request sent is accounted for, which wrk cannot say when a
    server stops answering. Python, but the same client with and without slow connections."""
    address = urlsplit(base_url)
    headers = {"Content-Type": payload.content_type, "Authorization": f"Bearer {token}"}
    ms, failed, lock = [], Counter(), threading.Lock()
    stop_at = time.monotonic() + seconds

    def client():
        conn = None
        while time.monotonic() < stop_at:
            conn = conn or HTTPConnection(address.hostname, address.port,
                                          timeout=GOOD_TIMEOUT_S)
            start = time.perf_counter()
            try:
                conn.request("POST", path, body=payload.body, headers=headers)
                answer = conn.getresponse()
                answer.read()
                status = answer.status
            except OSError:
                status, conn = 0, conn.close()
            with lock:
                if status == 200:
                    ms.append((time.perf_counter() - start) * 1000)
                else:
                    failed[status] += 1
        if conn:
            conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started, cpu = time.monotonic(), time.process_time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - started
    return Good(ms, failed, wall, (time.process_time() - cpu) / wall * 100)


def slow_rows(proto: str, n: int, good: Good, base: Good | None,
              slow: SlowClients | None) -> list[Row]:
    """p50, p99, throughput and failures of good requests with `n` slow connections held."""
    held = f"{n} held" if slow else "none held"
    detail = f"{slow.held()}/{n} slow held to the end" if slow else ""
    if slow and slow.refused:
        detail += f", {slow.refused} refused"
    sent = len(good.ms) + sum(good.failed.values())
    return [Row(f"slow {proto}: p50, {held}", good.percentile(50), "ms",
                base and base.percentile(50), detail),
            Row(f"slow {proto}: p99, {held}", good.percentile(99), "ms",
                base and base.percentile(99)),
            Row(f"slow {proto}: req/s, {held}", len(good.ms) / good.seconds, "req/s",
                base and len(base.ms) / base.seconds,
                f"client CPU {good.client_cpu_pct:.0f}% of a core"),
            Row(f"slow {proto}: good failed, {held}", sum(good.failed.values()), "req",
                base and sum(base.failed.values()),
                f"of {sent}; {statuses_text(good.failed)}")]


def slow_part(server: Server, models: Models, opts) -> list[Row]:
    name = models.image[0]
    token = server.keys()["inference"]
    targets = {"rest": (server.url("inference"), f"/predictions/{name}", rest_payload(name)),
               "oip": (server.url("oip"), f"/v2/models/{name}/infer", oip_payload(name))}
    rows = []
    for proto, (base_url, path, payload) in targets.items():
        good = functools.partial(good_requests, base_url, path, payload, token, opts.clients,
                                 opts.cell_seconds)
        log.info("slow %s: %s, %d good clients for %ss, no slow connection held", proto,
                 name, opts.clients, opts.cell_seconds)
        base = good()
        rows += slow_rows(proto, 0, base, None, None)
        for n in opts.slow:
            log.info("slow %s: the same with %d slow connections held", proto, n)
            with SlowClients(base_url, path, n) as slow:
                time.sleep(1.0)  # accepted and trickling before the good requests start
                rows += slow_rows(proto, n, good(), base, slow)
    return rows
