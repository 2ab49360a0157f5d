"""The least front proxy: an nginx that forwards to one TorchServe port and does nothing else,
the floor any proxy in front of a server costs (kiln bench's "plain best, bare proxy" row,
loadtests/studies/front_floor.py); start_nginx and stop_nginx also run key_check_cost's
variants."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

import psutil

from kiln.deploy import front, supervise
from kiln.deploy.owner_only import owner_only
from kiln.deploy.ports import HOST, Ports


def bare_conf(folder: Path, port: int, upstream_port: int, token: str | None,
              connections: int = 1024) -> str:
    """The least nginx that forwards: the settings Kiln's front shares with any HTTP/1.1
    reverse proxy that keeps its upstream connections, and nothing else."""
    auth = f'        proxy_set_header Authorization "Bearer {token}";\n' if token else ""
    temp = "".join(f"    {kind}_temp_path {folder / kind};\n"
                   for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return (f"{front.run_as_line()}daemon off;\nworker_processes 1;\npid {folder / 'nginx.pid'};\n"
            "error_log stderr warn;\n"
            f"events {{\n    worker_connections {connections};\n}}\n"
            "http {\n    access_log off;\n" + temp
            + f"    upstream backend {{\n        server {HOST}:{upstream_port};\n"
            f"        keepalive {connections // 2};\n    }}\n"
            f"    server {{\n        listen {HOST}:{port};\n"
            "        location / {\n            proxy_pass http://backend;\n"
            "            proxy_http_version 1.1;\n"
            '            proxy_set_header Connection "";\n' + auth
            + "        }\n    }\n}\n")


class BareProxy:
    """A bare nginx (bare_conf) on a free port in front of `upstream` (a base URL), adding
    `token` as the upstream's bearer key; its folder (the token is in its config) readable
    by its owner only. Stopped by stop(), or on leaving a `with` block."""

    def __init__(self, folder: Path, upstream: str, token: str | None):
        folder.mkdir(parents=True)
        owner_only(folder)
        self.port = Ports.free().inference  # one of a set no other server here is given
        (folder / supervise.CONF).write_text(
            bare_conf(folder, self.port, urlsplit(upstream).port, token))
        self.proc = start_nginx(folder, self.port)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def processes(self) -> list[psutil.Process]:
        master = psutil.Process(self.proc.pid)
        return [master, *master.children()]

    def __enter__(self) -> BareProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        stop_nginx(self.proc)


def start_nginx(folder: Path, port: int, timeout: float = 10) -> subprocess.Popen:
    """nginx from `folder`'s config (supervise.nginx_command), once it accepts on `port`;
    stopped again, and an error raised, if it exits or does not accept within `timeout`."""
    proc = subprocess.Popen(supervise.nginx_command(folder), stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while not front.accepts(HOST, port):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_nginx(proc)
            raise RuntimeError(f"nginx in {folder} did not start")
        time.sleep(0.05)
    return proc


def stop_nginx(proc: subprocess.Popen) -> None:
    """A graceful quit (SIGQUIT: requests in flight finish), killed after 15 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGQUIT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
