"""TorchServe's ports, defined once, and which run folder's server holds them."""

from __future__ import annotations

import json
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
        """Ports the OS says are free now (for tests and side-by-side servers), never one this
        process handed out before: two sets asked for before either server binds its ports
        must not share one."""
        sockets, ports = [], []
        try:
            while len(ports) < len(fields(cls)):
                s = socket.socket()
                s.bind((HOST, 0))
                sockets.append(s)
                port = s.getsockname()[1]
                if port not in _HANDED_OUT:
                    ports.append(port)
            _HANDED_OUT.update(ports)
            return cls(*ports)
        finally:
            for s in sockets:
                s.close()


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
