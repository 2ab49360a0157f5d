"""TorchServe's ports, defined once, and which run folder's server holds them."""

from __future__ import annotations

import json
import random
import socket
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

import psutil

HOST = "127.0.0.1"
PORTS_FILE = "ports.json"  # in the run folder: how stop, predict and loadtest find a server
INTERNAL_PORTS_FILE = "internal_ports.json"  # TorchServe's own, behind the front proxy


# Every port Ports.free() has returned in this process.
_HANDED_OUT: set[int] = set()
# The kernel's range of ports for outgoing connections (Linux's default when it cannot be read).
EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
EPHEMERAL_DEFAULT = (32768, 60999)
LOWEST_FREE = 10000  # under it: the well-known and the usual services' ports


def ephemeral_range() -> tuple[int, int]:
    try:
        low, high = (int(n) for n in EPHEMERAL_RANGE_FILE.read_text().split())
    except (OSError, ValueError):
        return EPHEMERAL_DEFAULT
    return low, high


def unclaimed_ports(ephemeral: tuple[int, int]) -> range:
    """Where Ports.free() looks: outside the ephemeral range, which any process's connect()
    draws from. A port the OS handed out for bind((host, 0)) is in it, and once released it
    could be a client socket's before the server binds it: a README test's kiln serve once
    found TorchServe's internal inference port taken so ("Address already in use")."""
    low, high = ephemeral
    below, above = range(LOWEST_FREE, low), range(high + 1, 65536)
    return below if len(below) >= len(above) else above


@dataclass(frozen=True)
class Ports:
    """The one place TorchServe's ports are defined."""

    inference: int = 8080
    management: int = 8081
    metrics: int = 8082
    grpc_inference: int = 7070
    grpc_management: int = 7071
    # The Open Inference Protocol (KServe v2 REST), served by Kiln's frontend plugin.
    oip: int = 8085
    # TorchServe's gRPC inference API with Kiln's versions (routes, shadows, the version in
    # each answer's metadata), served by the plugin. Behind the front proxy (kiln serve, the
    # container) only the internal one is bound, and the proxy's gRPC port forwards there
    # (TorchServe's own grpc_inference then serves nobody).
    kiln_grpc: int = 7072
    # The Open Inference Protocol over gRPC (KServe's inference.GRPCInferenceService), served
    # by the plugin (GrpcOip.java); behind the front proxy, on its internal one.
    oip_grpc: int = 8086

    @classmethod
    def saved(cls, run_dir: Path, name: str = PORTS_FILE) -> Ports | None:
        """The ports a server started from `run_dir` wrote there, if any (`name`:
        INTERNAL_PORTS_FILE for TorchServe's own behind the front proxy)."""
        path = run_dir / name
        return cls(**json.loads(path.read_text())) if path.exists() else None

    @classmethod
    def free(cls) -> Ports:
        """Ports that are free now (for tests and side-by-side servers), outside the kernel's
        ephemeral range (unclaimed_ports), never one this process handed out before: two sets
        asked for before either server binds its ports must not share one."""
        candidates = unclaimed_ports(ephemeral_range())
        ports = []
        for port in random.sample(candidates, len(candidates)):
            if len(ports) == len(fields(cls)):
                break
            if port not in _HANDED_OUT and bindable(port):
                ports.append(port)
        else:
            raise OSError(f"fewer than {len(fields(cls))} free ports in {candidates}")
        _HANDED_OUT.update(ports)
        return cls(*ports)


def bindable(port: int) -> bool:
    """Whether nothing holds `port` on HOST now (a listener, a connection, one in TIME_WAIT)."""
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


# What a TorchServe frontend's command line has, and nothing else's.
FRONTEND_CLASS = "org.pytorch.serve.ModelServer"


def run_dirs_on(ports: Mapping[str, int]) -> list[Path]:
    """The run folders of the TorchServe frontends running here whose public ports include
    every {api: port} given: how `kiln stop --inference-port P` finds a server started from
    another folder. A frontend runs in its run folder (the launcher's working directory)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "cwd"]):
        if FRONTEND_CLASS not in (proc.info["cmdline"] or []) or not proc.info["cwd"]:
            continue
        run_dir = Path(proc.info["cwd"])
        try:
            saved = Ports.saved(run_dir)
        except (OSError, ValueError, TypeError):  # a folder that is not a Kiln run folder
            continue
        if saved and all(getattr(saved, api) == port for api, port in ports.items()):
            found.append(run_dir)
    return found
