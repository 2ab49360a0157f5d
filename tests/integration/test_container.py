"""kiln-container on the host, as a container would run it (docs/deploy.md): nginx in front
with the keys and the probes, TorchServe behind it on loopback, SIGTERM drained.

One entrypoint serves the module; the drain test runs last and stops it."""

import http.client
import json
import logging
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path

import psutil
import pytest
import requests

from kiln.deploy import contract
from kiln.grpc_client import GrpcClient
from kiln.model_store.archive import STORE
from kiln.model_store.build import ensure_built

log = logging.getLogger("kiln.tests")

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
MODEL = "binary"
GRACE_S = 20
DRAIN_DELAY_S = 1.5
KEY_1 = "k1-" + "A" * 19 + "x9"
KEY_2 = "k2-" + "b" * 19 + "Z7"
UNAUTHORIZED = {"error": "missing or unknown key", "code": 401}


def benign_body() -> bytes:
    return (FIXTURES / "breast_cancer" / "benign.json").read_bytes()


def port_offset() -> int:
    """An offset that puts every public and internal port of the contract on a free port."""
    ports = [*contract.PUBLIC_PORTS.values(),
             *(getattr(contract.INTERNAL_PORTS, f.name) for f in fields(contract.INTERNAL_PORTS))]
    for _ in range(50):
        offset = random.randrange(20000, 65535 - max(ports))
        try:
            for port in ports:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port + offset))
        except OSError:
            continue
        return offset
    pytest.fail("no free set of ports")


def write_keys(path: Path, *keys: str) -> None:
    tmp = path.with_name(".keys.tmp")
    tmp.write_text("# kiln keys\n" + "".join(f"{k}\n" for k in keys))
    tmp.replace(path)  # as Kubernetes swaps a Secret's files: atomically


@dataclass
class Probe:
    at: float
    status: int | None  # None: connection refused


class Container:
    def __init__(self, folder: Path):
        self.keys_file = folder / "keys"
        write_keys(self.keys_file, KEY_1)
        self.log_path = folder / "container.log"
        self.offset = port_offset()
        self.public = {k: v + self.offset for k, v in contract.PUBLIC_PORTS.items()}
        with open(self.log_path, "w") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "kiln.deploy.container", "--models", MODEL,
                 "--model-store", str(STORE), "--keys-file", str(self.keys_file),
                 "--run-dir", str(folder / "run"), "--listen", "127.0.0.1",
                 "--port-offset", str(self.offset), "--grace-seconds", str(GRACE_S),
                 "--drain-delay-seconds", str(DRAIN_DELAY_S)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)
        self.startup: list[Probe] = []

    def url(self, port: str, path: str) -> str:
        return f"http://127.0.0.1:{self.public[port]}{path}"

    def probe(self, path: str, port: str = "http") -> int | None:
        try:
            return requests.get(self.url(port, path), timeout=5).status_code
        except requests.ConnectionError:
            return None

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"kiln-container exited {self.process.returncode}:\n{self.log()}")
            status = self.probe(contract.READY_PATH)
            self.startup.append(Probe(time.monotonic(), status))
            if status == 200:
                return
            time.sleep(0.1)
        pytest.fail(f"/ready not 200 after {timeout}s:\n{self.log()}")

    def predict(self, key: str | None, port: str = "http") -> requests.Response:
        headers = {"Content-Type": "application/json"}
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        return requests.post(self.url(port, f"/predictions/{MODEL}"), data=benign_body(),
                             headers=headers, timeout=30)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def tree(self) -> list[psutil.Process]:
        parent = psutil.Process(self.process.pid)
        return [parent, *parent.children(recursive=True)]

    def kill(self) -> None:
        if self.process.poll() is None:
            for proc in reversed(self.tree()):
                proc.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def container(tmp_path_factory):
    ensure_built(MODEL)
    box = Container(tmp_path_factory.mktemp("container"))
    try:
        box.wait_ready()
        yield box
    finally:
        box.kill()


def eventually(check, timeout: float = 8.0) -> None:
    """Key changes reach nginx within a poll and a reload: a few seconds at most."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not within the time a keys reload takes"
        time.sleep(0.2)


# -- (a) probes, keys, ports ------------------------------------------------------------------
def test_ready_only_once_the_worker_has_loaded(container):
    before = [p.status for p in container.startup[:-1]]
    assert container.startup[-1].status == 200
    assert set(before) <= {None, 503}, before
    # nginx answered 503 while TorchServe was up but its worker was not (/ping said Healthy).
    assert 503 in before
    # The moment /ready said 200, the model answers.
    r = container.predict(KEY_1)
    assert r.status_code == 200, r.text
    assert r.json()["label"] == "benign"
    assert container.probe(contract.LIVE_PATH) == 200
    assert container.probe("/v2/health/ready", port="oip") == 200


def test_rest_needs_a_known_key(container):
    for key in (None, "wrong-" + "x" * 30, KEY_1.lower()):
        r = container.predict(key)
        assert (r.status_code, r.json()) == (401, UNAUTHORIZED), key
    assert container.predict(KEY_1).status_code == 200


def test_oip_needs_a_known_key(container):
    rows = json.loads((FIXTURES / "breast_cancer" / "rows.json").read_text())
    body = {"inputs": [{"name": "input", "shape": [1, 30], "datatype": "FP64",
                        "data": rows[0]["features"]}]}
    url = container.url("oip", f"/v2/models/{MODEL}/infer")
    r = requests.post(url, json=body, timeout=30)
    assert (r.status_code, r.json()) == (401, UNAUTHORIZED)
    r = requests.post(url, json=body, timeout=30, headers={"Authorization": f"Bearer {KEY_1}"})
    assert r.status_code == 200, r.text
    labels = [o for o in r.json()["outputs"] if o["name"] == "label"][0]["data"]
    assert labels == [rows[0]["label"]]


def test_grpc_needs_a_known_key(container):
    target = f"127.0.0.1:{container.public['grpc']}"
    for key, status in ((None, 401), ("wrong-" + "x" * 30, 401), (KEY_1, 200)):
        with GrpcClient(target, key) as grpc:
            answer = grpc.predict(MODEL, benign_body(), "application/json")
        assert answer.status == status, (key, answer)
    assert answer.body["label"] == "benign"


@pytest.mark.parametrize("port", ["http", "oip", "metrics"])
def test_management_api_is_on_no_public_port(container, port):
    headers = {"Authorization": f"Bearer {KEY_1}"}
    for path in ("/models", f"/models/{MODEL}", "/api-description"):
        r = requests.get(container.url(port, path), headers=headers, timeout=10)
        assert r.status_code == 404, (port, path, r.text)
    r = requests.post(container.url(port, "/models?url=x.mar"), headers=headers, timeout=10)
    assert r.status_code == 404


def test_metrics_need_no_key(container):
    r = requests.get(container.url("metrics", "/metrics"), timeout=10)
    assert r.status_code == 200
    assert "ts_inference_requests_total" in r.text


# -- (b) key rotation without a restart -------------------------------------------------------
def test_keys_rotate_without_a_restart(container):
    pid = container.process.pid
    write_keys(container.keys_file, KEY_1, KEY_2)
    eventually(lambda: container.predict(KEY_2).status_code == 200)
    assert container.predict(KEY_1).status_code == 200
    write_keys(container.keys_file, KEY_2)
    eventually(lambda: container.predict(KEY_1).status_code == 401)
    assert container.predict(KEY_2).status_code == 200
    # A file with a bad key is refused, loudly, and the keys loaded before keep working.
    write_keys(container.keys_file, "short")
    eventually(lambda: "too short" in container.log())
    assert container.predict(KEY_2).status_code == 200
    write_keys(container.keys_file, KEY_1)
    eventually(lambda: container.predict(KEY_1).status_code == 200)
    assert container.process.pid == pid and container.process.poll() is None


# -- (c) SIGTERM drains -----------------------------------------------------------------------
@dataclass
class Sent:
    started: float
    sent: float | None = None      # every byte of the request handed to the socket
    answered: float | None = None
    status: int | None = None
    error: str | None = None


class Load:
    """A few clients sending real requests in a loop over keep-alive connections."""

    def __init__(self, container: Container, clients: int = 4):
        self.port = container.public["http"]
        self.body = benign_body()
        self.records: list[Sent] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.client, daemon=True)
                        for _ in range(clients)]

    def client(self) -> None:
        conn = None
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY_1}"}
        while not self.stop.is_set():
            rec = Sent(time.monotonic())
            with self.lock:
                self.records.append(rec)
            try:
                conn = conn or http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
                conn.request("POST", f"/predictions/{MODEL}", body=self.body, headers=headers)
                rec.sent = time.monotonic()
                response = conn.getresponse()
                response.read()
                rec.answered, rec.status = time.monotonic(), response.status
                if response.will_close:
                    conn.close()
                    conn = None
            except OSError as err:
                rec.error = type(err).__name__
                if conn is not None:
                    conn.close()
                conn = None
                time.sleep(0.02)  # pacing for a refused connection, not for a request
            except http.client.HTTPException as err:
                rec.error = type(err).__name__
                conn.close()
                conn = None

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=40)


def test_sigterm_drains_answers_in_flight_and_leaves_nothing(container):
    tree = container.tree()
    names = sorted({p.name() for p in tree})
    assert {"nginx", "java"} <= set(names), names
    probes: list[Probe] = []
    stop_probing = threading.Event()

    def probe_ready():
        while not stop_probing.is_set():
            probes.append(Probe(time.monotonic(), container.probe(contract.READY_PATH)))
            time.sleep(0.02)

    prober = threading.Thread(target=probe_ready, daemon=True)
    with Load(container) as load:
        prober.start()
        time.sleep(1.0)
        signalled = time.monotonic()
        container.process.send_signal(signal.SIGTERM)
        in_flight = sum(1 for r in list(load.records) if r.answered is None and r.error is None)
        try:
            code = container.process.wait(timeout=GRACE_S + 5)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {GRACE_S + 5}s after SIGTERM:\n{container.log()}")
        exited = time.monotonic()
        time.sleep(0.3)  # keep sending after the exit: every one refused
    stop_probing.set()
    prober.join(timeout=10)

    records = list(load.records)
    not_ready = next(p.at for p in probes if p.at >= signalled and p.status == 503)
    refused = [p.at for p in probes if p.status is None]
    refused += [r.started for r in records if r.error is not None]
    first_refused = min(refused)
    sent_before = [r for r in records if r.sent is not None and r.sent < not_ready]
    sent_during = [r for r in records if r.sent is not None and r.sent >= not_ready]
    figures = {
        "requests_in_flight_at_sigterm": in_flight,
        "sent_before_readiness_false": len(sent_before),
        "answered_200_of_those": sum(r.status == 200 for r in sent_before),
        "sent_while_draining": len(sent_during),
        "answered_200_while_draining": sum(r.status == 200 for r in sent_during),
        "answered_after_sigterm": sum(1 for r in records
                                      if r.answered and r.answered >= signalled),
        "refused_or_reset": sum(1 for r in records if r.error is not None),
        "readiness_false_after_s": round(not_ready - signalled, 3),
        "first_refusal_after_s": round(first_refused - signalled, 3),
        "exit_after_s": round(exited - signalled, 3),
        "exit_code": code,
    }
    print("\ndrain figures:", json.dumps(figures))
    log.info("drain figures: %s", figures)

    assert code == 0, container.log()
    assert exited - signalled <= GRACE_S
    assert not_ready < first_refused
    # Listeners stayed open for the drain delay.
    assert first_refused - signalled >= DRAIN_DELAY_S - 0.1
    assert sent_before and all(r.status == 200 for r in sent_before), \
        [r for r in sent_before if r.status != 200]
    # Nothing of the tree is left: nginx, the JVM, the workers.
    alive = [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, alive


def test_a_dead_child_stops_the_container(tmp_path):
    """nginx gone: the entrypoint stops TorchServe and exits non-zero (the orchestrator
    restarts the container), leaving nothing behind."""
    box = Container(tmp_path)
    try:
        box.wait_ready()
        tree = box.tree()
        nginx_master = next(p for p in tree if p.name() == "nginx" and p.ppid() == box.process.pid)
        nginx_master.kill()
        code = box.process.wait(timeout=GRACE_S + 5)
    finally:
        box.kill()
    assert code == 1, box.log()
    assert "stopping the container" in box.log()
    assert not [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
