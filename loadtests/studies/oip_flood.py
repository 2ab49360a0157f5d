"""A flood of the largest binary Open Inference Protocol requests (issue 16): clients sending,
in turn, the largest request a model takes and the largest one it refuses, in binary BOOL,
UINT8 and FP32, for a bounded time, while the TorchServe frontend's RSS is sampled.

Binary tensors once became JSON text inside the frontend (25 MB for a 4 MB request) before
the handler refused them: eight such clients took the JVM from 250 MB to 1.34 GB and out of
heap. What counts here: no 5xx, the same workers after as before, and the frontend's RSS.
The reliability benchmark runs this as its part `oip_flood`; the integration test asserts it.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import psutil
import requests

from kiln.deploy.server import Server
from kiln.handlers import limits
from kiln.loadtests.monitor import Sampler

BINARY_HEADER = "Inference-Header-Content-Length"
# The datatypes of the probe: one byte a value (BOOL, UINT8) and four (FP32).
DATATYPES = {"BOOL": 1, "UINT8": 1, "FP32": 4}
MB = 1024 * 1024
# A request not answered this long counts as failed (status 0): far above what the largest
# legal request takes, below the front proxy's own read timeout.
REQUEST_TIMEOUT_S = 60


@dataclass(frozen=True)
class Case:
    """One binary infer request: its JSON header, then `size` zero bytes of tensor data."""

    name: str
    header: bytes
    size: int

    @property
    def body(self) -> bytes:
        return self.header + bytes(self.size)


def binary_case(name: str, input_name: str, datatype: str, shape: list[int]) -> Case:
    size = DATATYPES[datatype]
    for dim in shape:
        size *= dim
    header = json.dumps({"inputs": [{"name": input_name, "shape": shape, "datatype": datatype,
                                     "parameters": {"binary_data_size": size}}]}).encode()
    return Case(name, header, size)


def flood_cases(input_name: str, row_shape: list[int], max_body: int) -> list[Case]:
    """Per datatype, the largest request the model takes (MAX_INSTANCES rows) and the largest
    body the server receives at all (max_body), a flat tensor as in the issue's probe."""
    cases = []
    for datatype, width in DATATYPES.items():
        cases.append(binary_case(f"{datatype} legal", input_name, datatype,
                                 [limits.MAX_INSTANCES, *row_shape]))
        # The header's length barely depends on the count: two tries settle it.
        count = max_body // width
        for _ in range(2):
            case = binary_case(f"{datatype} refused", input_name, datatype, [count])
            count = (max_body - len(case.header)) // width
        cases.append(binary_case(f"{datatype} refused", input_name, datatype, [count]))
    return cases


def model_input(server: Server, model: str, key: str) -> tuple[str, list[int]]:
    """The model's one OIP input: its name and row shape, from the plugin's metadata."""
    r = requests.get(f"{server.url('oip')}/v2/models/{model}", timeout=10,
                     headers={"Authorization": f"Bearer {key}"})
    r.raise_for_status()
    tensor = r.json()["inputs"][0]
    return tensor["name"], tensor["shape"][1:]


def worker_pids(server: Server, models: list[str]) -> dict[str, list[int]]:
    return {m: sorted(int(w.get("pid", -1)) for w in server.model_status(m)) for m in models}


@dataclass
class RssSampler(Sampler):
    """The frontend's RSS in bytes, at start(), every `interval` seconds and at stop()."""

    pid: int = 0

    def sample(self):
        self.samples.append(psutil.Process(self.pid).memory_info().rss)


@dataclass
class Flood:
    """What the flood got: answers by case and status (0: none), and the frontend's RSS."""

    clients: int
    seconds: float
    statuses: dict[str, Counter] = field(default_factory=dict)
    rss_before: int = 0
    rss_peak: int = 0
    rss_after: int = 0
    workers_before: dict = field(default_factory=dict)
    workers_after: dict = field(default_factory=dict)

    @property
    def requests(self) -> int:
        return sum(sum(c.values()) for c in self.statuses.values())

    @property
    def server_errors(self) -> int:
        """Answers of 5xx other than 503 (a bound's "try again"), and requests unanswered."""
        return sum(n for c in self.statuses.values() for s, n in c.items()
                   if s == 0 or (s >= 500 and s != 503))

    @property
    def workers_replaced(self) -> int:
        return sum(len(set(self.workers_before[m]) - set(pids))
                   for m, pids in self.workers_after.items())

    def rows(self) -> list[tuple]:
        """(name, value, unit, base, detail) rows for the reliability table."""
        detail = "; ".join(f"{case}: " + ", ".join(f"{s or 'none'} x{n}"
                                                   for s, n in sorted(c.items()))
                           for case, c in self.statuses.items())
        label = f"binary OIP flood ({self.clients} clients x {self.seconds:.0f} s)"
        return [
            (f"{label}: requests", self.requests, "requests", None, detail),
            (f"{label}: 5xx or none", self.server_errors, "requests", None, "503 not counted"),
            (f"{label}: JVM RSS peak", self.rss_peak / MB, "MB", self.rss_before / MB,
             "base: RSS before"),
            (f"{label}: JVM RSS after", self.rss_after / MB, "MB", self.rss_before / MB,
             "base: RSS before"),
            (f"{label}: workers replaced", self.workers_replaced, "workers", None, ""),
        ]


class Client(threading.Thread):
    """One keep-alive client sending the cases in turn until `deadline` (monotonic)."""

    def __init__(self, url: str, key: str, cases: list[Case], deadline: float, first: int):
        super().__init__(daemon=True)
        self.url, self.cases, self.deadline, self.next = url, cases, deadline, first
        self.headers = {"Authorization": f"Bearer {key}",
                        "Content-Type": "application/octet-stream"}
        self.statuses = {case.name: Counter() for case in cases}

    def run(self):
        bodies = [case.body for case in self.cases]
        with requests.Session() as session:
            while time.monotonic() < self.deadline:
                case = self.cases[self.next % len(self.cases)]
                body = bodies[self.next % len(self.cases)]
                self.next += 1
                headers = {**self.headers, BINARY_HEADER: str(len(case.header))}
                try:
                    status = session.post(self.url, data=body, headers=headers,
                                          timeout=REQUEST_TIMEOUT_S).status_code
                except requests.RequestException:
                    status = 0
                self.statuses[case.name][status] += 1


def flood(server: Server, model: str, clients: int = 8, seconds: float = 20) -> Flood:
    """`clients` clients sending flood_cases() to `model` through server.url("oip")."""
    key = server.keys()["inference"]
    input_name, row_shape = model_input(server, model, key)
    cases = flood_cases(input_name, row_shape, server.settings.max_request_size)
    models = list(server.settings.models) or [model]
    result = Flood(clients, seconds, workers_before=worker_pids(server, models))
    sampler = RssSampler(0.1, pid=server.pid()).start()
    deadline = time.monotonic() + seconds
    url = f"{server.url('oip')}/v2/models/{model}/infer"
    threads = [Client(url, key, cases, deadline, first=i) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + REQUEST_TIMEOUT_S + 10)
    sampler.stop()
    rss = sampler.samples
    result.rss_before, result.rss_peak, result.rss_after = rss[0], max(rss), rss[-1]
    result.workers_after = worker_pids(server, models)
    for case in cases:
        result.statuses[case.name] = sum((t.statuses[case.name] for t in threads), Counter())
    return result
