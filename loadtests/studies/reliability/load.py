"""Load: wrk POSTing a mix of requests (mix.lua counts the answers by status), and one
looping client."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import requests

from kiln import client as http
from kiln.deploy.server import Server
from kiln.loadtests import wrk
from kiln.loadtests.studies.reliability.served import rest_payload
from kiln.loadtests.studies.reliability.table import failures

MIX_LUA = Path(__file__).with_name("mix.lua")


@dataclass
class Load:
    run: wrk.WrkRun
    statuses: Counter

    @property
    def socket_errors(self) -> int:
        non_2xx_3xx = sum(c for s, c in self.statuses.items() if not 200 <= s < 400)
        return self.run.errors - non_2xx_3xx

    @property
    def failed(self) -> int:
        return failures(self.statuses) + self.socket_errors


class Mix:
    """wrk POSTing `calls` (path, body, content type) in turn at `clients` connections for
    `seconds`, in the background from construction until finish()."""

    def __init__(self, base_url: str, calls: list[tuple[str, bytes, str]], token: str,
                 clients: int, seconds: float):
        self._folder = tempfile.TemporaryDirectory(prefix="kiln-reliability-")
        folder = Path(self._folder.name)
        lines = []
        for i, (path, body, content_type) in enumerate(calls):
            (folder / f"body{i}").write_bytes(body)
            lines.append(f"{path}\t{content_type}\t{folder / f'body{i}'}")
        (folder / "mix.txt").write_text("\n".join(lines) + "\n")
        env = dict(os.environ, KILN_MIX=str(folder / "mix.txt"), KILN_WRK_TOKEN=token)
        cmd = ["wrk", "-t1", f"-c{clients}", f"-d{max(1, round(seconds))}s", "--latency",
               "--timeout", "30s", "-s", str(MIX_LUA), base_url]
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def finish(self) -> Load:
        try:
            out = self.proc.stdout.read()
            # wait4, not wait: this wrk's own CPU, whatever else runs beside it.
            _, status, usage = os.wait4(self.proc.pid, 0)
            self.proc.returncode = os.waitstatus_to_exitcode(status)
        finally:
            self.proc.stdout.close()
            self._folder.cleanup()
        if self.proc.returncode != 0:
            raise wrk.WrkError(f"wrk failed ({self.proc.returncode}): {out}")
        run = wrk.parse(out)
        run.client_cpu_pct = ((usage.ru_utime + usage.ru_stime)
                              / (time.monotonic() - self.started) * 100)
        statuses = Counter()
        for status, count in re.findall(r"^kiln-status (\d+) (\d+)$", out, re.M):
            statuses[int(status)] += int(count)
        return Load(run, statuses)


class Caller(threading.Thread):
    """One keep-alive client sending the same request in a loop, `pause` seconds apart, until
    stop(); `calls` holds (sent, answered, status) in monotonic seconds (status 0: none)."""

    def __init__(self, server: Server, name: str, pause: float, timeout: float = 30):
        super().__init__(daemon=True)
        self.client = http.Client(server.url("inference"), server.keys()["inference"],
                                  timeout=timeout)
        self.model, self.payload, self.pause = name, rest_payload(name), pause
        self.calls: list[tuple[float, float, int]] = []
        self._halt = threading.Event()

    def run(self):
        while not self._halt.is_set():
            sent = time.monotonic()
            try:
                status = self.client.predict(self.model, self.payload.body,
                                             self.payload.content_type).status
            except requests.RequestException:
                status = 0
            self.calls.append((sent, time.monotonic(), status))
            self._halt.wait(self.pause)

    def stop(self) -> list[tuple[float, float, int]]:
        self._halt.set()
        self.join(timeout=60)
        return self.calls
