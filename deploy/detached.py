"""A process Kiln starts detached, to outlive the command that started it (nginx's supervisor,
the metrics exporter, the admin service): its pid file, its log, a start that waits until it
is ready, and a stop that signals, then kills. `kiln stop` finds it again by the pid file
alone. The services among them serve on a Unix socket: serve_until_signalled and
unix_accepts are their two ends."""

from __future__ import annotations

import contextlib
import signal
import socket
import socketserver
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from kiln.deploy import logs, processes
from kiln.keys import write_private

READY_POLL_S = 0.05
# A Unix socket's path must fit in sockaddr_un (108 bytes with its terminating NUL).
MAX_SOCKET_PATH = 107


class Detached:
    """`name` is what messages call it; `mark` is a string its command line holds, so that a
    recorded pid that now belongs to another process is not taken for it."""

    def __init__(self, name: str, pid_file: Path, log_file: Path, mark: str,
                 error: type[Exception] = RuntimeError):
        self.name = name
        self.pid_file = pid_file
        self.log_file = log_file
        self.mark = mark
        self.error = error

    def pid(self) -> int | None:
        """Its pid, if it runs."""
        return pid_from(self.pid_file, self.mark)

    def start(self, command: list[str], ready: Callable[[], bool], timeout: float,
              console: bool = False) -> None:
        """Started in a session of its own and answering (`ready`) when this returns; stopped
        again when it is not ready within `timeout`. `console`: its output on this process's
        stderr rather than in its log file."""
        with contextlib.ExitStack() as stack:
            out = None if console else stack.enter_context(open(self.log_file, "ab"))
            proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                    start_new_session=True)
        write_private(self.pid_file, f"{proc.pid}\n")  # whole, or not there, for `kiln stop`
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:  # a port or socket taken, say: its log says why
                raise self.error(f"{self.name} exited with status {proc.returncode}:\n"
                                 f"{self.log_tail()}")
            if ready():
                return
            time.sleep(READY_POLL_S)
        self.stop()
        raise self.error(f"{self.name} did not start within {timeout:g} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 5) -> bool:
        """SIGTERM, killed after `timeout`; False when none ran."""
        pid = self.pid()
        self.pid_file.unlink(missing_ok=True)
        if pid is None:
            return False
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            proc.send_signal(signal.SIGTERM)
            for p in processes.wait_exited([proc], timeout):
                p.kill()
        return True

    def log_tail(self, lines: int = 20) -> str:
        return logs.tail(self.log_file, lines, f"(no log of {self.name})")


def pid_from(pid_file: Path, mark: str) -> int | None:
    """The pid in `pid_file` if that process runs and `mark` is in its command line (a
    recorded pid may belong to anything now)."""
    try:
        pid = int(pid_file.read_text().strip())
        cmdline = psutil.Process(pid).cmdline()
    except (OSError, ValueError, psutil.Error):
        return None
    return pid if any(mark in part for part in cmdline) else None


def check_socket_path(path: Path, error: type[Exception]) -> None:
    if len(str(path).encode()) > MAX_SOCKET_PATH:
        raise error(f"{path} is longer than a Unix socket path may be ({MAX_SOCKET_PATH} "
                    f"bytes): use a shorter run folder")


def serve_until_signalled(server: socketserver.BaseServer, socket_path: Path) -> None:
    """`server` serving until SIGTERM or SIGINT; its socket file removed after."""
    def stop(signum, frame):
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        socket_path.unlink(missing_ok=True)


def unix_accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(0.5)
        return s.connect_ex(str(path)) == 0
