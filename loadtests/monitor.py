"""What happens around a load test, sampled in background threads: TorchServe's Prometheus
metrics (scraped before, every few seconds during, and after) and the CPU of the server's
and the load generator's processes (psutil; 100 % is one core)."""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass, field

import psutil
import requests

log = logging.getLogger("kiln.loadtest")
SAMPLE = re.compile(r"^([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
KEPT_PREFIXES = ("kiln_", "ts_")


def parse_metrics(text: str) -> dict[tuple[str, tuple], float]:
    """Prometheus text format -> {(name, sorted label pairs): value}, Kiln's and TorchServe's
    own ts_ series only (hostnames dropped: one server)."""
    samples = {}
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if not match or not match[1].startswith(KEPT_PREFIXES):
            continue
        labels = tuple(sorted((k, v) for k, v in LABEL.findall(match[2] or "")
                              if k.lower() != "hostname"))
        samples[(match[1], labels)] = float(match[3])
    return samples


@dataclass
class Sampler:
    """Calls `sample()` every `interval` seconds in a thread until stop()."""

    interval: float
    samples: list = field(default_factory=list)

    def __post_init__(self):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self):
        self.sample()
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        self._thread.join()
        self.sample()

    def _loop(self):
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self):
        raise NotImplementedError


@dataclass
class MetricsScraper(Sampler):
    url: str = ""

    def sample(self):
        try:
            text = requests.get(self.url, timeout=5).text
        except requests.RequestException as err:
            log.warning("cannot scrape %s: %s", self.url, err)
            return
        self.samples.append((time.time(), parse_metrics(text)))


def process_tree(pid: int | None) -> list[psutil.Process]:
    if pid is None:
        return []
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


@dataclass
class CpuSampler(Sampler):
    """CPU % of process trees by group, e.g. {"server": java pid, "client": locust pid}."""

    roots: dict = field(default_factory=dict)

    def __post_init__(self):
        super().__post_init__()
        self._known: dict[int, psutil.Process] = {}

    def _percent(self, pid: int | None) -> float:
        total = 0.0
        for proc in process_tree(pid):
            known = self._known.setdefault(proc.pid, proc)
            try:
                total += known.cpu_percent(None)  # since this process's last sample
            except psutil.Error:
                pass
        return total

    def sample(self):
        self.samples.append((time.time(), {g: self._percent(p) for g, p in self.roots.items()}))


def listening_pid(port: int) -> int | None:
    """The process that listens on a local TCP port (a server this run did not start)."""
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
                return conn.pid
    except psutil.Error:
        pass
    return None
