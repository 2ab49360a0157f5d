"""A frontend killed hard leaves its pid file, its key file, its workers and its front proxy
behind: kiln stop and kiln serve clean them up, and say so."""

import dataclasses
import os
import signal
import socket
import subprocess
import sys

import psutil
import pytest

from kiln.deploy.server import Ports, Server, ServerError, ServerSettings
from kiln.model_store.build import ensure_built
from kiln.workspace import Workspace


def test_stop_and_serve_clean_up_after_a_killed_frontend(tmp_path):
    ensure_built("binary")
    server = Server(ServerSettings(run_dir=tmp_path, model_store=Workspace.current().model_store,
                                   models=["binary"],
                                   ports=Ports.free(), internal_ports=Ports.free()))
    server.start()
    server.wait_ready(120)
    nginx = psutil.Process(server.front.pid())
    frontend = psutil.Process(server.pid())
    os.kill(frontend.pid, signal.SIGKILL)
    frontend.wait(timeout=10)
    # An idle worker exits when its frontend's socket closes; one busy in a long model call
    # outlives it. This stand-in has such a worker's command line and never exits by itself.
    stuck = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)",
                              "ts/model_service_worker.py", "--sock-type", "unix", "--sock-name",
                              str(server.run_dir / "tmp" / ".ts.sock.9001")])
    workers = [psutil.Process(stuck.pid)]
    # What a killed frontend leaves: its pid file, its key file, a worker still running.
    assert server.pid_file.exists() and server.key_file.exists()
    assert server.pid() is None
    assert [p.pid for p in server.orphan_workers()] == [stuck.pid]
    assert server.front.pid() == nginx.pid

    done = subprocess.run([sys.executable, "-m", "kiln.cli", "stop", "--run-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "removed the pid file of a TorchServe that is gone" in done.stderr
    assert f"stopped {len(workers)} orphan worker(s)" in done.stderr
    assert "stopped the front proxy (nginx) of a TorchServe that is gone" in done.stderr
    assert psutil.wait_procs([nginx], timeout=10)[1] == []
    assert server.front.pid() is None
    assert not server.pid_file.exists() and not server.key_file.exists()
    assert stuck.wait(timeout=10) == -signal.SIGTERM

    # And serve again from the same folder, as if nothing had happened.
    with server.running(timeout=120):
        assert server.pid() is not None
    assert server.orphan_workers() == []


def test_a_front_that_cannot_start_leaves_no_torchserve_behind(tmp_path):
    ensure_built("binary")
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    ports = dataclasses.replace(Ports.free(), inference=taken.getsockname()[1])
    server = Server(ServerSettings(run_dir=tmp_path, model_store=Workspace.current().model_store,
                                   models=["binary"],
                                   ports=ports, internal_ports=Ports.free()))
    try:
        with pytest.raises(ServerError, match="nginx exited with status 1"):
            with server.running(timeout=120):
                pass
        assert "Address already in use" in server.front.log_tail()
        assert server.pid() is None and server.front.pid() is None
        assert server.orphan_workers() == []
    finally:
        taken.close()
        server.stop()
