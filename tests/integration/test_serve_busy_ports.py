"""kiln serve on a busy port says which port and what holds it, before it builds or starts
anything (it used to export and archive, then fail with nginx's raw bind() errors)."""

import socket
import subprocess
import sys
from dataclasses import replace

import psutil

from kiln.deploy.server import Ports, Server, ServerSettings
from kiln.model_store.build import ensure_built
from kiln.workspace import Workspace


def serve(run_dir, store, ports: Ports, *flags: str) -> subprocess.CompletedProcess:
    port_flags = [a for api, port in vars(ports).items()
                  for a in (f"--{api.replace('_', '-')}-port", str(port))]
    return subprocess.run([sys.executable, "-m", "kiln.cli", "serve", "binary",
                           "--run-dir", str(run_dir), "--store", str(store), *port_flags,
                           *flags], capture_output=True, text=True, timeout=120)


def test_a_port_held_by_another_process_is_named_and_nothing_is_built(tmp_path):
    run_dir, store = tmp_path / "run", tmp_path / "store"
    store.mkdir()
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        done = serve(run_dir, store, replace(Ports.free(), oip=port))
    assert done.returncode == 1, done.stderr
    me = psutil.Process()
    assert (f"oip port {port} on 127.0.0.1 is in use by pid {me.pid} ({me.name()})\n"
            in done.stderr)
    assert "nothing was built or started" in done.stderr
    assert "bind()" not in done.stderr
    assert list(store.iterdir()) == []  # no archive built
    assert not run_dir.exists()  # no config written, nothing started from it


def test_a_port_held_by_a_kiln_server_names_its_run_folder_and_how_to_stop_it(tmp_path):
    ensure_built("binary")
    server = Server(ServerSettings(run_dir=tmp_path / "elsewhere",
                                   model_store=Workspace.current().model_store,
                                   models=["binary"], ports=Ports.free(),
                                   internal_ports=Ports.free()))
    try:
        server.start()
        server.wait_ready(120)
        done = serve(tmp_path / "run", Workspace.current().model_store, server.ports, "--no-build")
        assert done.returncode == 1, done.stderr
        lines = [line.split(" kiln ", 1)[1] for line in done.stderr.splitlines()
                 if " kiln " in line]
        held = f"on 127.0.0.1 is in use by pid {{}} ({{}}), Kiln's server run from {server.run_dir}"
        nginx = held.format(server.front.pid(), "nginx")
        java = held.format(server.pid(), "java")
        p = server.ports
        assert lines[-9:] == [
            f"inference port {p.inference} {nginx}",
            f"management port {p.management} {java}",
            f"metrics port {p.metrics} {nginx}",
            f"grpc inference port {p.grpc_inference} {nginx}",
            f"grpc management port {p.grpc_management} {java}",
            f"oip port {p.oip} {nginx}",
            f"oip grpc port {p.oip_grpc} {nginx}",
            f"stop Kiln's server run from {server.run_dir} with: kiln stop --run-dir "
            f"{server.run_dir}",
            "nothing was built or started: stop what holds the port, or serve on another one "
            "(--inference-port and the other port flags)",
        ]
        assert server.pid() is not None  # the running one is left alone
    finally:
        server.stop()
