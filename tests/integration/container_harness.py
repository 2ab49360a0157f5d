"""kiln-container on the host as a container would run it, and bounded load on it: shared by
the container tests and the rolling-restart drill."""

import contextlib
import http.client
import random
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
from kiln.workspace import Workspace

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
MODEL = "binary"
GRACE_S = 20
DRAIN_DELAY_S = 1.5
KEY_1 = "k1-" + "A" * 19 + "x9"
KEY_2 = "k2-" + "b" * 19 + "Z7"
UNAUTHORIZED = {"error": "missing or unknown key", "code": 401}
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
FIRST_UNPRIVILEGED = 1024


def benign_body() -> bytes:
    return (FIXTURES / "breast_cancer" / "benign.json").read_bytes()


def first_ephemeral_port() -> int:
    """Where the ports the kernel hands out to outgoing connections (and to bind(0), as in
    Ports.free()) begin."""
    return int(EPHEMERAL_RANGE.read_text().split()[0])


def port_offset() -> int:
    """An offset that puts every public and internal port of the contract on a free port below
    the ephemeral range. A restarted container binds its ports again; within the range, any
    outgoing connection on the host (and its TIME_WAIT, 60 s) may hold one meanwhile, and
    TorchServe's start then fails (tests/integration/test_rolling_restart.py's flake)."""
    ports = [*contract.PUBLIC_PORTS.values(),
             *(getattr(contract.INTERNAL_PORTS, f.name) for f in fields(contract.INTERNAL_PORTS))]
    below = first_ephemeral_port()
    if below - max(ports) <= FIRST_UNPRIVILEGED - min(ports):
        pytest.fail(f"no room below the ephemeral ports ({below}-) for the contract's ports")
    for _ in range(50):
        offset = random.randrange(FIRST_UNPRIVILEGED - min(ports), below - max(ports))
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


@contextlib.contextmanager
def readiness_probes(container):
    """The readiness probe's answers (a list of Probe), every 20 ms from a thread, as a
    kubelet sends them, until the block ends; the list is complete once it has."""
    probes: list[Probe] = []
    stop = threading.Event()

    def probe_ready():
        while not stop.is_set():
            probes.append(Probe(time.monotonic(), container.probe(contract.READY_PATH)))
            time.sleep(0.02)

    prober = threading.Thread(target=probe_ready, daemon=True)
    prober.start()
    try:
        yield probes
    finally:
        stop.set()
        prober.join(timeout=10)


class Container:
    def __init__(self, folder: Path, offset: int | None = None, store: Path | None = None,
                 args: tuple[str, ...] = (), model: str = MODEL):
        self.keys_file = folder / "keys"
        write_keys(self.keys_file, KEY_1)
        self.log_path = folder / "container.log"
        self.offset = port_offset() if offset is None else offset
        self.public = {k: v + self.offset for k, v in contract.PUBLIC_PORTS.items()}
        with open(self.log_path, "w") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "kiln.deploy.container", "--models", model,
                 "--model-store", str(store or Workspace.current().model_store), "--keys-file",
                 str(self.keys_file),
                 "--run-dir", str(folder / "run"), "--listen", "127.0.0.1",
                 "--port-offset", str(self.offset), "--grace-seconds", str(GRACE_S),
                 "--drain-delay-seconds", str(DRAIN_DELAY_S), *args],
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

    def wait_reloaded(self, timeout: float = 10) -> None:
        """Until nginx runs one worker again after a reload. For about 100 ms after starting
        the new worker, nginx's master keeps the old one accepting too, with the old keys."""
        master = next(p for p in psutil.Process(self.process.pid).children()
                      if p.name() == "nginx")
        deadline = time.monotonic() + timeout
        while len(master.children()) != 1:
            assert time.monotonic() < deadline, f"nginx still has workers {master.children()}"
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL to the whole tree, parents first: a parent killed after its child
        (nginx's master, TorchServe's frontend) would start a replacement that outlives it,
        still listening on the container's ports."""
        if self.process.poll() is None:
            tree = self.tree()
            for proc in tree:
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.kill()
            psutil.wait_procs(tree, timeout=10)
            self.process.wait()



@dataclass
class Sent:
    started: float
    sent: float | None = None      # every byte of the request handed to the socket
    answered: float | None = None
    status: int | None = None
    error: str | None = None


class Load:
    """A few clients sending real requests in a loop over keep-alive connections."""

    def __init__(self, port: int, clients: int = 4):
        self.port = port
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
