"""Which of a server's ports are taken, and by what.

`kiln serve` asks before it builds anything: otherwise a busy port shows up only after the
exports and archives, as nginx's raw `bind() ... Address already in use` lines.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from pathlib import Path

import psutil

from kiln.deploy.server import FRONTEND_CLASS, HOST, PORTS_FILE, ServerSettings


def taken(port: int) -> bool:
    """A bind test on HOST, with SO_REUSEADDR as nginx and TorchServe bind theirs: a port
    with only closing connections on it is free to them, a listening socket is not."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                return True
            raise
    return False


def listener(port: int) -> psutil.Process | None:
    """The process listening on `port`, None when none is visible (another user's are not).
    psutil names one process per socket, and an nginx worker shares its master's: the
    topmost ancestor of the same name is the one to name (the master)."""
    pid = next((c.pid for c in psutil.net_connections(kind="tcp")
                if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
                and c.pid), None)
    if pid is None:
        return None
    with contextlib.suppress(psutil.Error):
        proc = psutil.Process(pid)
        parent = proc.parent()
        while parent is not None and parent.name() == proc.name():
            proc, parent = parent, parent.parent()
        return proc
    return None


def kiln_run_dir(proc: psutil.Process) -> Path | None:
    """The run folder of the Kiln server `proc` belongs to: a TorchServe frontend runs in
    it, its front proxy's nginx in its nginx/ folder. None for anything else."""
    try:
        cwd, cmdline, name = Path(proc.cwd()), proc.cmdline(), proc.name()
    except psutil.Error:
        return None
    run_dir = cwd if FRONTEND_CLASS in cmdline else cwd.parent if name == "nginx" else None
    return run_dir if run_dir is not None and (run_dir / PORTS_FILE).exists() else None


def holder(port: int) -> tuple[str, Path | None]:
    """What holds `port`, in words, and the run folder when it is a Kiln server."""
    proc = listener(port)
    if proc is None:
        return "a process this user cannot see (another user's, or outside this namespace)", None
    try:
        what, run_dir = f"pid {proc.pid} ({proc.name()})", kiln_run_dir(proc)
    except psutil.Error:
        return f"pid {proc.pid}, which has exited since", None
    if run_dir is not None:
        what += f", Kiln's server run from {run_dir}"
    return what, run_dir


def busy(settings: ServerSettings) -> list[str]:
    """One line per port a server of `settings` would bind but cannot, naming what holds
    it, then how to stop each Kiln server among the holders. The public ports, and
    TorchServe's own behind the front proxy."""
    # Behind the front proxy nothing binds the public kiln gRPC port: nginx's gRPC port is
    # grpc_inference, and the plugin binds only its internal one.
    fronted = settings.internal_ports is not None
    wanted = [(f"{api.replace('_', ' ')} port", port)
              for api, port in vars(settings.ports).items()
              if not (fronted and api == "kiln_grpc")]
    if settings.internal_ports is not None:
        own = settings.torchserve_ports()
        wanted += [(f"TorchServe's own {api.replace('_', ' ')} port", port)
                   for api, port in vars(own).items() if port != getattr(settings.ports, api)]
    if settings.admin_port is not None:
        wanted.append(("admin port", settings.admin_port))
    lines, run_dirs = [], []
    for what, port in wanted:
        if not taken(port):
            continue
        text, run_dir = holder(port)
        lines.append(f"{what} {port} on {HOST} is in use by {text}")
        if run_dir is not None and run_dir not in run_dirs:
            run_dirs.append(run_dir)
    return lines + [f"stop Kiln's server run from {d} with: kiln stop --run-dir {d}"
                    for d in run_dirs]
