"""Which ports kiln serve checks before it starts: those a server of its settings binds."""

import socket
from dataclasses import replace
from pathlib import Path

from kiln.deploy.port_holders import busy
from kiln.deploy.server import Ports, ServerSettings


def settings(ports: Ports, fronted: bool) -> ServerSettings:
    return ServerSettings(run_dir=Path("run"), model_store=Path("store"), models=["binary"],
                          ports=ports, internal_ports=Ports.free() if fronted else None)


def test_the_public_kiln_grpc_port_counts_only_where_torchserve_binds_it():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        ports = replace(Ports.free(), kiln_grpc=held.getsockname()[1])
        # Behind the front proxy the plugin binds its internal port only: 7072 in use by
        # something else is no reason to refuse (it was reported before).
        assert busy(settings(ports, fronted=True)) == []
        (line,) = busy(settings(ports, fronted=False))
        assert line.startswith(f"kiln grpc port {ports.kiln_grpc} on 127.0.0.1 is in use by pid ")
