"""A rolling restart as Kubernetes does one, stood in for on the host: two kiln-containers
behind a real load balancer (HAProxy, health-checking /ready), bounded load through it, one
instance drained (SIGTERM) and started again, then the other. Not one request may fail, and
HAProxy may neither retry nor redispatch one: readiness and draining must do it all."""

import csv
import io
import json
import logging
import re
import shutil
import signal
import socket
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from container_harness import GRACE_S, MODEL, Container, Load, port_offset

from kiln.deploy import contract
from kiln.model_store.build import ensure_built

log = logging.getLogger("kiln.tests")
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"

HAPROXY_CONFIG = """\
global
    maxconn 512
    stats socket {socket} mode 600 level admin
    # Each request, with the server that answered and how it ended, and each check's change
    # of state: what a failed run leaves to read.
    log stdout format raw local0

defaults
    mode http
    log global
    option httplog
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    # Every failure must reach the client: no second try, no other server.
    retries 0
    no option redispatch

frontend kiln
    bind 127.0.0.1:{port}
    default_backend instances

backend instances
    balance roundrobin
    option httpchk GET {ready}
    http-check expect status 200
    # As Kubernetes' readiness probe (timeout 1 s, three failures), every 200 ms: out of
    # rotation within 300 ms of /ready saying 503 (well within the drain delay), never for one
    # slow answer. Timed out at 200 ms (HAProxy's default: inter) with fall 1, one slow /ready on
    # a loaded host took the instance left serving out too: 4,304 503s, no server (a CI flake).
    timeout check 1s
    default-server inter 200ms fastinter 50ms fall 3 rise 2
{servers}
"""


# An option httplog line: client [accepted] frontend backend/server timers status bytes ...
REQUEST_LINE = re.compile(r"\S+ \[[^]]+\] \S+ \S+/(?P<server>\S+) \S+ (?P<status>-?\d+) \S+ "
                          r"\S+ \S+ (?P<ended>\S{4}) ")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Balancer:
    def __init__(self, folder: Path, instances: dict[str, Container]):
        self.port = free_port()
        self.socket = folder / "haproxy.sock"
        servers = "\n".join(f"    server {name} 127.0.0.1:{box.public['http']} check"
                            for name, box in instances.items())
        config = folder / "haproxy.cfg"
        config.write_text(HAPROXY_CONFIG.format(socket=self.socket, port=self.port,
                                                ready=contract.READY_PATH, servers=servers))
        check = subprocess.run([HAPROXY, "-c", "-f", str(config)], capture_output=True,
                               text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        self.log_path = folder / "haproxy.log"
        with open(self.log_path, "w") as out:
            self.process = subprocess.Popen([HAPROXY, "-db", "-f", str(config)],
                                            stdout=out, stderr=subprocess.STDOUT)

    def stats(self) -> dict[str, dict[str, str]]:
        """`show stat`, by server name (and BACKEND)."""
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self.socket))
            s.sendall(b"show stat\n")
            raw = b""
            while chunk := s.recv(65536):
                raw += chunk
        rows = csv.DictReader(io.StringIO(raw.decode().lstrip("# ")))
        return {row["svname"]: row for row in rows if row["pxname"] == "instances"}

    def wait_status(self, server: str, status: str, timeout: float = 120) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            try:
                if self.stats().get(server, {}).get("status", "").startswith(status):
                    return time.monotonic()
            except (FileNotFoundError, ConnectionRefusedError):  # haproxy still starting
                assert self.process.poll() is None, self.log_path.read_text()
            time.sleep(0.05)
        pytest.fail(f"haproxy never saw {server} {status}:\n{self.stats().get(server)}")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)

    def report(self) -> str:
        """Its checks' changes of state, and the requests not answered 200 counted by server,
        status and how each ended (---- the server's own answer; SC, SH: HAProxy's)."""
        changes, bad = [], Counter()
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("Server instances/"):
                changes.append(line)
            elif (m := REQUEST_LINE.match(line)) and m["status"] != "200":
                bad[m["server"], m["status"], m["ended"]] += 1
        return "\n".join([*changes, *(f"{n} x {key}" for key, n in bad.most_common())])


# What an instance's logs say of its start and stop: the entrypoint, TorchServe's bind, nginx's.
LIFECYCLE_LINE = re.compile(r"kiln-container|Failed to bind|already in use|\[(emerg|alert|crit)\]")


def instance_logs(folders: dict[str, Path]) -> str:
    """The lifecycle lines of each instance's drained run and of its fresh one."""
    parts = []
    for name, folder in folders.items():
        for log_file in (folder / "drained.log", folder / "container.log"):
            if log_file.exists():
                lines = [line for line in log_file.read_text(errors="replace").splitlines()
                         if LIFECYCLE_LINE.search(line)]
                parts.append(f"-- {name} {log_file.name}:\n" + "\n".join(lines[-20:]))
    return "\n".join(parts)


def restart(name: str, box: Container, balancer: Balancer, folder: Path) -> tuple[Container, dict]:
    """Drain one instance and start it again on the same ports; the figures of its restart."""
    signalled = time.monotonic()
    box.process.send_signal(signal.SIGTERM)
    marked_down = balancer.wait_status(name, "DOWN")
    code = box.process.wait(timeout=GRACE_S + 5)
    exited = time.monotonic()
    assert code == 0, box.log()
    box.log_path.rename(box.log_path.with_name("drained.log"))  # kept beside the fresh one's
    fresh = Container(folder, offset=box.offset)
    fresh.wait_ready()
    back_up = balancer.wait_status(name, "UP")
    return fresh, {"instance": name, "exit_code": code,
                   "marked_down_after_s": round(marked_down - signalled, 3),
                   "exited_after_s": round(exited - signalled, 3),
                   "back_in_rotation_after_s": round(back_up - signalled, 3)}


def test_rolling_restart_behind_a_load_balancer_fails_no_request(tmp_path):
    if not Path(HAPROXY).exists():
        pytest.skip("haproxy is not installed (scripts/bootstrap.sh installs Debian's)")
    ensure_built(MODEL)
    folders = {name: tmp_path / name for name in ("a", "b")}
    for folder in folders.values():
        folder.mkdir()
    offset_a = port_offset()
    boxes = {"a": Container(folders["a"], offset=offset_a)}
    boxes["b"] = Container(folders["b"], offset=port_offset())
    balancer = None
    try:
        for box in boxes.values():
            box.wait_ready()
        balancer = Balancer(tmp_path, boxes)
        for name in boxes:
            balancer.wait_status(name, "UP")
        restarts = []
        with Load(balancer.port, clients=4) as load:
            time.sleep(2.0)
            for name in ("a", "b"):
                boxes[name], figures = restart(name, boxes[name], balancer, folders[name])
                restarts.append(figures)
                time.sleep(2.0)  # both serving again before the next one goes
        records = list(load.records)
        stats = balancer.stats()
    finally:
        if balancer is not None:
            balancer.stop()
        for box in boxes.values():
            box.kill()

    answered = [r for r in records if r.status is not None]
    failed = [r for r in records if r.error is not None or r.status != 200]
    backend = stats["BACKEND"]
    figures = {"requests_sent": sum(r.sent is not None for r in records),
               "answered": len(answered),
               "failed": len(failed),
               "haproxy_retries": int(backend["wretr"] or 0),
               "haproxy_redispatches": int(backend["wredis"] or 0),
               "per_server": {name: int(stats[name]["stot"]) for name in boxes},
               "restarts": restarts}
    print("\nrolling restart figures:", json.dumps(figures))
    log.info("rolling restart figures: %s", figures)
    assert failed == [], f"{failed[:5]}\n{balancer.report()}\n{instance_logs(folders)}"
    assert (figures["haproxy_retries"], figures["haproxy_redispatches"]) == (0, 0)
    assert all(n > 0 for n in figures["per_server"].values())
