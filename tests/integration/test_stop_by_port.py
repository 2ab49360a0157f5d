"""kiln stop --PORT-port stops the server on that port, whichever run folder it was started
from, and refuses, stopping nothing, a port no server of Kiln's has."""

import subprocess
import sys

from kiln.deploy.server import Ports, Server, ServerSettings
from kiln.model_store.build import ensure_built
from kiln.workspace import Workspace


def test_stop_finds_the_server_on_the_port_it_is_given(tmp_path):
    ensure_built("binary")
    server = Server(ServerSettings(run_dir=tmp_path / "elsewhere",
                                   model_store=Workspace.current().model_store,
                                   models=["binary"], ports=Ports.free(),
                                   internal_ports=Ports.free()))
    empty = tmp_path / "run"
    empty.mkdir()
    stop = [sys.executable, "-m", "kiln.cli", "stop", "--run-dir", str(empty)]
    try:
        server.start()
        server.wait_ready(120)
        # One of its ports, but not its inference port: no server is chosen.
        wrong = subprocess.run([*stop, "--inference-port", str(server.ports.oip)],
                               capture_output=True, text=True, timeout=60)
        assert wrong.returncode == 1
        assert (f"no TorchServe of Kiln's runs here with inference port {server.ports.oip}"
                in wrong.stderr)
        assert server.pid() is not None

        done = subprocess.run([*stop, "--inference-port", str(server.ports.inference),
                               "--oip-port", str(server.ports.oip)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert f"TorchServe stopped ({server.run_dir})" in done.stderr
        assert server.pid() is None and server.front.pid() is None
    finally:
        server.stop()
