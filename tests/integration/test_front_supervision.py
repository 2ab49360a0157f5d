"""kiln serve's front proxy under supervision, and what its run folder lets others read (issue 16).

A killed nginx master left its workers answering with the keys they held: a rotation no longer
reached them, `kiln serve` could not bind the ports and `kiln stop` left them listening. Now a
supervisor starts a new master with the folder's keys, a rotation that cannot reach a master
fails, and stop and serve end what is left of a front.
"""

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests

from kiln.deploy import processes
from kiln.deploy.server import Ports, Server, ServerSettings
from kiln.keys import read_keys
from kiln.workspace import Workspace

MODEL = "binary"
ROW = {"instances": [[0.1] * 30]}
WAIT_S = 30  # an upper bound for a state to come, never a measured time


@pytest.fixture
def served(archives, tmp_path):
    srv = Server(ServerSettings(run_dir=tmp_path / "run",
                                model_store=Workspace.current().model_store, models=[MODEL],
                                ports=Ports.free(), internal_ports=Ports.free()))
    with srv.running(timeout=240):
        yield srv


def kiln(server, *args):
    return subprocess.run([sys.executable, "-m", "kiln.cli", *args, "--run-dir",
                           str(server.run_dir)], capture_output=True, text=True, timeout=120)


def rest(server, key):
    return requests.post(f"{server.url('inference')}/predictions/{MODEL}", json=ROW, timeout=30,
                         headers={"Authorization": f"Bearer {key}"}).status_code


def wait_for(condition, what):
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"no {what} within {WAIT_S} s"
        time.sleep(0.02)


def workers_of(pid):
    return psutil.Process(pid).children()


def gone(procs: list[psutil.Process]) -> bool:
    """Exited, zombies included (init may be slow to reap them)."""
    return all(map(processes.exited, procs))


def refuses(port):
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_a_killed_master_is_replaced_its_workers_end_and_rotation_reaches_the_new_one(served):
    front = served.front
    old_key = served.keys()["inference"]
    master = front.pid()
    workers = workers_of(master)
    os.kill(master, signal.SIGKILL)
    wait_for(lambda: front.pid() not in (None, master), "new nginx master")
    wait_for(lambda: gone(workers), "end of the old master's workers")
    assert rest(served, old_key) == 200
    done = kiln(served, "keys", "rotate", "--overlap", "0")
    assert done.returncode == 0, done.stderr
    new_key = served.keys()["inference"]
    assert new_key != old_key
    # The old key ends at the next whole second (ends are rounded up), as the file says.
    (end,) = [k.expires for k in read_keys(served.front.keys_file) if k.value == old_key]
    wait_for(lambda: time.time() >= end, "end of the old key")
    assert (rest(served, old_key), rest(served, new_key)) == (401, 200)


def test_without_master_and_supervisor_rotation_fails_and_stop_and_serve_end_the_orphans(served):
    front = served.front
    key_file_before = front.keys_file.read_text()
    master = front.pid()
    workers = workers_of(master)
    os.kill(front.supervisor_pid(), signal.SIGKILL)
    os.kill(master, signal.SIGKILL)
    wait_for(lambda: front.pid() is None, "end of the master")
    assert not gone(workers)  # the orphans still answer with the keys they had
    assert rest(served, served.keys()["inference"]) == 200

    done = kiln(served, "keys", "rotate", "--overlap", "0")
    assert done.returncode == 1
    assert "has no master but 1 nginx process(es) still answer" in done.stderr
    assert front.keys_file.read_text() == key_file_before

    # kiln serve, with TorchServe running and its front gone: the orphans end, a front starts.
    done = kiln(served, "serve", "--no-build", MODEL, *port_flags(served))
    assert done.returncode == 0, done.stderr
    assert gone(workers)
    assert front.pid() not in (None, master)
    assert rest(served, served.keys()["inference"]) == 200

    # Once more without a master or supervisor: kiln stop ends the orphans too.
    workers = workers_of(front.pid())
    os.kill(front.supervisor_pid(), signal.SIGKILL)
    os.kill(front.pid(), signal.SIGKILL)
    wait_for(lambda: front.pid() is None, "end of the master")
    done = kiln(served, "stop", *port_flags(served))
    assert done.returncode == 0, done.stderr
    assert gone(workers)
    assert not front.processes()
    assert all(refuses(port) for port in (served.ports.inference, served.ports.oip,
                                          served.ports.grpc_inference, served.ports.metrics))


def port_flags(server):
    flags = {"inference": "--inference-port", "management": "--management-port",
             "metrics": "--metrics-port", "grpc_inference": "--grpc-inference-port",
             "grpc_management": "--grpc-management-port", "oip": "--oip-port"}
    return [part for api, flag in flags.items() for part in (flag, str(getattr(server.ports, api)))]


def secrets_of(server) -> list[str]:
    keys = [line.split()[0] for line in server.front.keys_file.read_text().splitlines()
            if line and not line.startswith("#")]
    return [*keys, *server.torchserve_keys().values()]


def test_no_file_others_may_read_holds_a_key_or_a_token(served):
    done = kiln(served, "keys", "rotate")
    assert done.returncode == 0, done.stderr
    secrets = secrets_of(served)
    assert len(secrets) == 5  # two keys, TorchServe's three tokens
    # Printed only when asked for.
    assert not any(s in done.stdout + done.stderr for s in secrets)
    assert kiln(served, "keys", "show").stdout.strip() == secrets[1]
    assert stat.S_IMODE(served.run_dir.stat().st_mode) == 0o700
    readable, holding = [], []
    for path in Path(served.run_dir).rglob("*"):
        if path.is_symlink() or not path.is_file():
            continue
        if path.stat().st_mode & 0o077:
            readable.append(path)
            data = path.read_bytes()
            holding += [str(path) for s in secrets if s.encode() in data]
    assert not holding, holding
    # Every file is owner-only, not only those that hold a secret today.
    assert not readable, readable
