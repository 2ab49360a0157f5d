"""The supervisor of kiln serve's front proxy: runs nginx and starts it again when its master dies.

nginx's workers outlive a master killed hard and keep serving with the keys they hold: a key
rotation no longer reaches them, and they keep the public ports from a new master. So when
the master exits without being asked to, its whole process group (nginx runs in a session of
its own, and its workers stay in its group) is killed at once, and a new master starts with
the keys list as the folder holds it. A master that keeps dying is given up after
MAX_RESTARTS in RESTART_WINDOW_S: then nothing serves the public ports, which is better than
an unsupervised orphan.

SIGTERM or SIGINT stops it: nginx's graceful quit (requests in flight are answered) within
--quit-timeout, then whatever is left of the group is killed. kiln-container does not use this:
its entrypoint is nginx's parent and stops the container when nginx dies.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from kiln.deploy import access_log, processes

log = logging.getLogger("kiln.front.supervisor")

NGINX = "/usr/sbin/nginx"
CONF = "nginx.conf"
PID_FILE = "supervisor.pid"  # in nginx's folder, beside nginx.pid
LOG_FILE = "error.log"
POLL_S = 0.05  # how often the master is looked at: a restart comes within a few of these
MAX_RESTARTS = 5
RESTART_WINDOW_S = 30.0


def nginx_command(nginx_dir: Path) -> list[str]:
    return [NGINX, "-e", "stderr", "-p", str(nginx_dir), "-c", str(nginx_dir / CONF)]


def kill_group(pgid: int, timeout: float = 2.0) -> None:
    """SIGKILL to every process of the group and a wait until none runs (their sockets close
    as they exit, so a new master can bind the ports; a zombie holds none)."""
    members = [p for p in psutil.process_iter() if _pgid(p) == pgid]
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    processes.wait_exited(members, timeout)


def _pgid(proc: psutil.Process) -> int | None:
    try:
        return os.getpgid(proc.pid)
    except OSError:
        return None


class Supervisor:
    def __init__(self, nginx_dir: Path, quit_timeout: float,
                 rotations: list[access_log.Rotation] | None = None):
        self.nginx_dir = nginx_dir
        self.rotations = rotations or []  # Kiln's access and spans logs, those nginx writes
        self.quit_timeout = quit_timeout
        self.master: subprocess.Popen | None = None
        self.quit_by: float | None = None  # set by SIGTERM: when the graceful quit runs out
        self.started = False  # a master has served: from then on a dead one is replaced

    def _on_signal(self, signum, _frame) -> None:
        if self.quit_by is None:
            self.quit_by = time.monotonic() + self.quit_timeout
            if self.master is not None and self.master.poll() is None:
                self.master.send_signal(signal.SIGQUIT)

    def start_master(self) -> subprocess.Popen:
        # stdout and stderr are this process's own: the folder's error.log.
        return subprocess.Popen(nginx_command(self.nginx_dir), cwd=self.nginx_dir,
                                stdin=subprocess.DEVNULL, start_new_session=True)

    def master_up(self) -> bool:
        """nginx writes its pid file once its listeners are bound."""
        try:
            return int((self.nginx_dir / "nginx.pid").read_text()) == self.master.pid
        except (OSError, ValueError):
            return False

    def wait_master(self) -> int | None:
        """The master's exit status, or None when the graceful quit ran out."""
        while True:
            code = self.master.poll()
            if code is not None:
                return code
            self.started = self.started or self.master_up()
            if self.started:
                for rotation in self.rotations:
                    rotation.check(self.master.pid)
            if self.quit_by is not None and time.monotonic() > self.quit_by:
                return None
            time.sleep(POLL_S)

    def run(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        restarts: list[float] = []
        while self.quit_by is None:
            self.master = self.start_master()
            if self.quit_by is not None:  # a signal between the loop's test and the start
                self.master.send_signal(signal.SIGQUIT)
            code = self.wait_master()
            kill_group(self.master.pid)  # orphaned workers, or what the quit left
            if self.quit_by is not None:
                return 0
            if not self.started:  # the first master never came up (a port taken, say)
                log.error("nginx exited with status %s before it served", code)
                return code or 1
            now = time.monotonic()
            restarts = [t for t in restarts if now - t < RESTART_WINDOW_S] + [now]
            if len(restarts) > MAX_RESTARTS:
                log.error("nginx's master exited %d times in %.0f s: giving up; nothing serves "
                          "the public ports (kiln stop, then kiln serve)", len(restarts),
                          RESTART_WINDOW_S)
                return 1
            log.error("nginx's master (pid %d) exited with status %s: its workers are stopped "
                      "and a new master starts", self.master.pid, code)
        return 0


def rotations_of(args: argparse.Namespace) -> list[access_log.Rotation]:
    return [access_log.Rotation(path, args.access_log_max_bytes) for path in args.access_log]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nginx-dir", type=Path, required=True,
                   help="nginx's folder: its configuration, keys list, pid and log")
    p.add_argument("--quit-timeout", type=float, default=10,
                   help="seconds a graceful quit may take before nginx is killed (default: 10)")
    p.add_argument("--access-log", type=Path, action="append", default=[],
                   help="a log of Kiln's that nginx writes (the access log, the spans log): "
                        "rotated here; repeated for each (default: none)")
    p.add_argument("--access-log-max-bytes", type=int, default=access_log.MAX_BYTES,
                   help=f"each one's size before rotation (default: {access_log.MAX_BYTES})")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    rotations = rotations_of(args)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s kiln-front-supervisor %(levelname)s %(message)s")
    try:  # its pid file is written by whoever started it (deploy/front.Front)
        return Supervisor(args.nginx_dir.resolve(), args.quit_timeout, rotations).run()
    finally:
        (args.nginx_dir / PID_FILE).unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
