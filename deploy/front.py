"""Kiln's front proxy: nginx in front of TorchServe's inference, OIP, gRPC and metrics ports.

`kiln serve` and kiln-container run the same one (deploy/nginx/nginx.conf). It owns the public
ports and what TorchServe cannot do itself:

- keys: clients send `Authorization: Bearer KEY`, checked against a keys file of long random
  keys that never expire unless rotated out. `rotate` adds a key and gives the others an end
  time: both work until then, and nginx itself refuses a key past its end (the check compares
  the request's time), so nothing has to run at that moment. Each nginx worker holds the keys
  and reads them again within KEYS_POLL_S of a change (deploy/nginx/kiln_keys.lua): no
  reload, which would close idle kept-alive connections. TorchServe's own tokens are 8
  characters, expire, and are replaced in place on renewal: behind the front they are a
  service credential only the proxy holds.
- form bodies: TorchServe's form decoder answers 500 to a malformed form before any worker
  sees it. The front hands multipart and urlencoded bodies to TorchServe as plain bytes, with
  their content type in a header of their own, and the handler decodes them (handlers/forms.py).
- every answer it makes itself (401, 404, 408, 413, 414, 431, a full queue's 503 with
  Retry-After) is a short JSON error, and slow or idle clients are cut off by its timeouts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import psutil

from kiln.deploy import access_log as access_log_rotation
from kiln.deploy import processes, routing, supervise
from kiln.deploy.detached import Detached, pid_from

# The header that carries a form body's content type past TorchServe to Kiln's handler, and
# the Retry-After of a 503 (about one batch later): the handler's own, so that both agree.
from kiln.handlers.errors import RETRY_AFTER_S
from kiln.handlers.forms import FORM_TYPE_HEADER
from kiln.handlers.oip import PROTOCOL_HEADER
from kiln.handlers.timing import RECEIVED_HEADER
from kiln.keys import (  # noqa: F401 (what kiln-container and kiln serve use from here)
    DEFAULT_OVERLAP_S,
    Key,
    KeysError,
    current,
    format_keys,
    new_key,
    parse_keys,
    private_dir,
    read_keys,
    rotate,
    write_keys,
    write_private,
)

NGINX = supervise.NGINX
ACCESS_LOG_FILE = "kiln_access.jsonl"
SPANS_LOG_FILE = "kiln_spans.jsonl"


def spans_log_path(run_dir: Path) -> Path:
    """The spans log of a run folder: the access log's lines of sampled traces only, which
    deploy/proxy_spans.py reads."""
    return run_dir.resolve() / "logs" / SPANS_LOG_FILE


def access_log_path(run_dir: Path) -> Path:
    """Kiln's JSON access log of a run folder (absolute: nginx runs from its own folder)."""
    return run_dir.resolve() / "logs" / ACCESS_LOG_FILE
TEMPLATE = Path(__file__).resolve().parent / "nginx" / "nginx.conf"
# Public connections per listener before new ones get 503: each proxied request holds two of
# nginx's worker_connections (client and upstream), so this leaves room under that bound.
MAX_CONNECTIONS = 512
WORKER_CONNECTIONS = 2048


# How often each nginx worker reads the keys list again (a small file, read whole): a key
# change, expiry aside, takes effect within it.
KEYS_POLL_S = 0.1
# Where Debian's nginx modules are (nginx -V: --modules-path); the key check needs its Lua
# module (libnginx-mod-http-lua, with ndk).
NGINX_MODULES = Path("/usr/lib/nginx/modules")
KEYS_LUA = TEMPLATE.parent / "kiln_keys.lua"
KEYS_LIST = "keys.list"  # in nginx's folder
# What each keyed listener runs before its key check: per request one Lua table lookup.
KEY_SET = ("set_by_lua_block $kiln_key_ok "
           "{ return kiln_keys.check(ngx.var.http_authorization, ngx.now()) }")
TAKEN_PREFIX = "keys.taken."  # + a worker's pid: the generation of the list it holds


def keys_list(keys: list[Key], now: float | None = None) -> str:
    """What nginx's workers read (deploy/nginx/kiln_keys.lua): "# GENERATION" (naming this
    content), then each key valid now and the second it ends ("-": never). A key ends at its end
    rounded up to a whole second, as the keys file writes it."""
    now = time.time() if now is None else now
    lines = "".join(f"{k.value} {'-' if k.expires is None else math.ceil(k.expires)}\n"
                    for k in keys if k.valid_at(now))
    return f"# {hashlib.sha256(lines.encode()).hexdigest()[:16]}\n{lines}"


def generation(keys_list_text: str) -> str:
    return keys_list_text.split("\n", 1)[0].removeprefix("# ")


# -- the configuration ---------------------------------------------------------------------------
@dataclass(frozen=True)
class FrontSettings:
    nginx_dir: Path  # its configuration, keys list, temp folders, pid and log
    keys_file: Path
    listen: str
    public: Mapping[str, int]  # http, oip, grpc, oip-grpc, metrics: what clients reach
    upstream: Mapping[str, int]  # the same names: TorchServe's ports on 127.0.0.1
    max_body: int  # TorchServe's max_request_size
    ready_path: str
    live_path: str
    draining_flag: Path  # readiness says no while it exists (kiln-container's drain)
    route_state: Path  # the versions served and their routes (deploy/routing.py), if any
    shutdown_s: int = 10  # what a graceful quit gives requests in flight
    # TorchServe's inference token when its token auth is on (kiln serve: its management API
    # keeps it); the proxy replaces the client's key with it. None: TorchServe checks nothing.
    upstream_token: str | None = None
    run_as: str = ""  # nginx's `user` line (as root only)
    # Kiln's metrics exporter (deploy/metrics_exporter.py), appended to TorchServe's /metrics
    # and served alone on /kiln-metrics; None: the metrics port serves TorchServe's only.
    kiln_metrics_socket: Path | None = None
    # Kiln's JSON access log (one line per request, written by nginx); None: none.
    access_log: Path | None = None
    access_log_max_bytes: int = access_log_rotation.MAX_BYTES  # then rotated (access_log.py)
    # The same lines for sampled traces only (an OTLP endpoint's, deploy/proxy_spans.py reads
    # them); None: none. The proxy-spans process follows this short log, not every request's.
    spans_log: Path | None = None
    trace_sample: float = 1.0  # the share of fresh traces sampled (0 to 1)
    # The admin port and Kiln's admin service behind it (deploy/admin_service.py); None: no
    # admin port (the default, as TorchServe's model API is off unless asked for).
    admin_port: int | None = None
    admin_socket: Path | None = None

    @property
    def conf(self) -> Path:
        return self.nginx_dir / "nginx.conf"

    @property
    def keys_list_file(self) -> Path:
        return self.nginx_dir / KEYS_LIST

    @property
    def pid_file(self) -> Path:
        return self.nginx_dir / "nginx.pid"


ERRORS = {  # nginx's own answers, as Kiln's JSON errors
    400: "bad request",
    404: "no such route",
    405: "method not allowed",
    408: "the request did not arrive in time",
    411: "the request needs a Content-Length",
    414: "the request line is too long",
    429: "too many requests: retry later",
    494: "the request headers are too large",
    500: "internal error",
    501: "the transfer encoding is not supported: send Content-Length or chunked",
    502: "TorchServe is not answering",
    503: "too many connections or requests: retry later",
    504: "TorchServe did not answer in time",
    505: "the HTTP version is not supported",
}
# Where those answers live: a URI, not a named location, because nginx cannot redirect a
# request whose request line it refused (no URI) to a named location. Open without a key.
ERROR_PREFIX = "/kiln-error/"


def error_pages(max_body: int, upstream: str = "TorchServe") -> str:
    """error_page lines and internal locations answering each of nginx's errors as short JSON;
    `upstream` is what 502 and 504 say is not answering."""
    errors = {**ERRORS, 413: f"the request body is larger than {max_body} bytes",
              502: f"{upstream} is not answering", 504: f"{upstream} did not answer in time"}
    lines = []
    for status, message in sorted(errors.items()):
        shown = 431 if status == 494 else status  # 494 is nginx's own name for 431
        lines.append(f"        error_page {status} ={shown} {ERROR_PREFIX}{status};\n"
                     f"        location = {ERROR_PREFIX}{status} {{\n"
                     f"            internal;\n"
                     f"            default_type application/json;\n"
                     f"            return {shown} '{json_error(shown, message)}';\n"
                     f"        }}\n")
    return "".join(lines)


# The longest path (query included) forwarded to TorchServe, whose request line may be 4,096
# bytes (Netty's default) with its method and version.
MAX_URI = 4000
LONG_PATH = f"the path with its query is longer than {MAX_URI} characters"
ODD_PATH = ("the path must be plain: no . or .. segment, no //, no encoded slash, dot or "
            "backslash")
# Requests with a missing or unknown key, per client address: this many a second, with a burst
# of REFUSED_KEY_BURST, then 429 with Retry-After. A client that lost its key still sees its
# 401s; a key guesser drops from ~160,000 tries a second to this. Clients behind one address
# (a NAT, loopback) share the allowance; a known key is never counted.
REFUSED_KEY_RATE = 50
REFUSED_KEY_BURST = 100
KEY_REFUSED_PATH = "/kiln-refused"
TOO_MANY_REFUSED = "too many requests with a missing or unknown key: retry later"


def json_error(status: int, message: str) -> str:
    """A short JSON error as an nginx string literal: single-quoted, so its double quotes
    stay as they are (nginx would unescape a backslash: none may be in it)."""
    body = json.dumps({"error": message, "code": status})
    if "'" in body or "\\" in body:
        raise ValueError(f"{body} cannot be an nginx string as it is")
    return body + "\\n"


def key_check() -> str:
    """What each keyed listener (http, oip) checks before routing: a path that needs
    normalising (400), a path too long for TorchServe (414), then the key (401, or 429 for a
    client that keeps sending unknown keys). The 401 comes from an internal location so that
    nginx's request limiter, which runs after the rewrite phase that returns, can count it; a
    jump to a named location does not run the listener's checks again."""
    return f"""\
        if ($kiln_path_refused) {{
            return 400 '{json_error(400, ODD_PATH)}';
        }}
        if ($kiln_path_long) {{
            return 414 '{json_error(414, LONG_PATH)}';
        }}
        {KEY_SET}
        if ($kiln_refuse) {{
            rewrite ^ {KEY_REFUSED_PATH} last;
        }}
        location = {KEY_REFUSED_PATH} {{
            internal;
            limit_req zone=kiln_refused_keys burst={REFUSED_KEY_BURST} nodelay;
            error_page 429 = @kiln_too_many_refused;
            try_files /kiln-no-such-file @kiln_unauthorized;
        }}
        location @kiln_unauthorized {{
            return 401 '{json_error(401, "missing or unknown key")}';
        }}
        location @kiln_too_many_refused {{
            return 429 '{json_error(429, TOO_MANY_REFUSED)}';
        }}
"""


KILN_METRICS_PATH = "/kiln-metrics"


def kiln_metrics(socket: Path | None) -> str:
    """The metrics listener's locations: TorchServe's page, and with an exporter Kiln's
    appended to it (nginx's addition module, by a subrequest), so that one scrape of /metrics
    reads both. A missing exporter adds a comment line, never an error page: Prometheus
    refuses a whole page that does not parse, and TorchServe's series would go with it."""
    if socket is None:
        return ("        location = /metrics {\n"
                "            rewrite ^ /metrics? break;\n"
                "            proxy_pass http://torchserve_metrics;\n"
                "        }\n")
    return (f"        location = /metrics {{\n"
            f"            rewrite ^ /metrics? break;\n"
            f"            proxy_pass http://torchserve_metrics;\n"
            # Any type: nginx 1.22 matches no listed type against TorchServe's
            # "text/plain; version=0.0.4; charset=utf-8".
            f"            addition_types *;\n"
            f"            add_after_body {KILN_METRICS_PATH};\n"
            f"        }}\n"
            f"        location = {KILN_METRICS_PATH} {{\n"
            f"            proxy_pass http://unix:{socket}:/metrics;\n"
            f"            proxy_intercept_errors on;\n"
            f"            error_page 404 500 502 503 504 = @kiln_metrics_down;\n"
            f"        }}\n"
            f"        location @kiln_metrics_down {{\n"
            f"            default_type text/plain;\n"
            f"            return 200 '# Kiln metrics exporter not answering\\n';\n"
            f"        }}\n")


def trace_sample(fraction: float) -> str:
    """split_clients lines: fresh traces sampled (flags 01) for `fraction` of the requests."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"the trace sample must be from 0 to 1, got {fraction:g}")
    percent = round(fraction * 100, 2)  # nginx reads two decimals
    if percent in (0, 100):
        return f"* {'01' if percent else '00'};"
    return f"{percent:g}% 01;\n        * 00;"


# What an admin request may hold (JSON arguments of a few short fields), and how long one may
# take: a deploy exports, archives, registers and warms before it answers.
ADMIN_MAX_BODY = 16 * 1024
ADMIN_READ_TIMEOUT_S = 900


def admin_server(s: FrontSettings) -> str:
    """The admin port's server block: the same refusals of odd and long paths, timeouts and
    JSON error pages as the other ports, a small body limit, and everything else to Kiln's
    admin service, which checks the admin key itself (so that rotating one needs no reload).
    Empty without an admin port."""
    if s.admin_port is None:
        return ""
    if s.admin_socket is None:
        raise ValueError("an admin port needs the admin service's socket")
    pages = error_pages(ADMIN_MAX_BODY, "the admin service").rstrip("\n").lstrip()
    return f"""\
    # Kiln's admin route (kiln serve --admin-port): admin keys only, checked by the service.
    server {{
        listen {s.listen}:{s.admin_port};
        limit_conn kiln_connections {MAX_CONNECTIONS};
        client_max_body_size {ADMIN_MAX_BODY};
        {pages}

        if ($kiln_path_refused) {{
            return 400 '{json_error(400, ODD_PATH)}';
        }}
        if ($kiln_path_long) {{
            return 414 '{json_error(414, LONG_PATH)}';
        }}
        location / {{
            proxy_pass http://unix:{s.admin_socket}:;
            # Set here, the http block's proxy_set_header lines are not inherited: the
            # client's key goes on, to the service that checks it.
            proxy_set_header Host $host;
            proxy_set_header Connection "";
            proxy_set_header Authorization $http_authorization;
            proxy_read_timeout {ADMIN_READ_TIMEOUT_S}s;
        }}
    }}
"""


def render(s: FrontSettings) -> str:
    values = {
        "NGINX_DIR": str(s.nginx_dir), "LISTEN": s.listen,
        "HTTP_PORT": s.public["http"], "OIP_PORT": s.public["oip"],
        "GRPC_PORT": s.public["grpc"], "OIP_GRPC_PORT": s.public["oip-grpc"],
        "METRICS_PORT": s.public["metrics"], "TS_OIP_GRPC": s.upstream["oip-grpc"],
        "TS_INFERENCE": s.upstream["http"], "TS_OIP": s.upstream["oip"],
        "TS_METRICS": s.upstream["metrics"], "TS_GRPC": s.upstream["grpc"],
        "MAX_BODY": s.max_body, "SHUTDOWN_S": s.shutdown_s,
        "READY_PATH": s.ready_path, "LIVE_PATH": s.live_path,
        "DRAINING_FLAG": str(s.draining_flag), "USER_LINE": s.run_as,
        "UPSTREAM_AUTH": f"Bearer {s.upstream_token}" if s.upstream_token else "",
        "FORM_TYPE_HEADER": FORM_TYPE_HEADER, "PROTOCOL_HEADER": PROTOCOL_HEADER,
        "RETRY_AFTER_S": RETRY_AFTER_S, "ROUTE_STATE": str(s.route_state),
        "ROUTE_HEADER_VAR": routing.nginx_variable(routing.ROUTE_HEADER),
        "ROUTE_PREFIX": routing.ROUTE_PREFIX, "REFUSED_PREFIX": routing.REFUSED_PREFIX,
        "SHADOW_HEADER_VAR": routing.nginx_variable(routing.SHADOW_HEADER),
        "SHADOW_PREFIX": routing.SHADOW_PREFIX, "SHADOWED_HEADER": routing.SHADOWED_HEADER,
        "ERROR_PREFIX": ERROR_PREFIX, "MAX_URI": MAX_URI,
        "ODD_PATH_ERROR": json_error(400, ODD_PATH), "REFUSED_KEY_RATE": REFUSED_KEY_RATE,
        "REFUSED_KEY_BURST": REFUSED_KEY_BURST, "KEY_REFUSED_PATH": KEY_REFUSED_PATH,
        "TOO_MANY_REFUSED": TOO_MANY_REFUSED,
        "LONG_PATH_ERROR": json_error(414, LONG_PATH),
        "KEY_CHECK": key_check().rstrip("\n").lstrip(),
        "NGINX_MODULES": NGINX_MODULES, "KEYS_LUA": json.dumps(str(KEYS_LUA)),
        "KEYS_LIST": json.dumps(str(s.keys_list_file)), "KEY_SET": KEY_SET,
        "TAKEN_PREFIX": json.dumps(str(s.nginx_dir / TAKEN_PREFIX)), "KEYS_POLL_S": KEYS_POLL_S,
        "MAX_CONNECTIONS": MAX_CONNECTIONS, "WORKER_CONNECTIONS": WORKER_CONNECTIONS,
        "ERROR_PAGES": error_pages(s.max_body).rstrip("\n").lstrip(),
        "KILN_METRICS": kiln_metrics(s.kiln_metrics_socket).rstrip("\n").lstrip(),
        "RECEIVED_HEADER": RECEIVED_HEADER, "TRACE_SAMPLE": trace_sample(s.trace_sample),
        "ACCESS_LOG": access_logs(s),
        "ADMIN_SERVER": admin_server(s).rstrip("\n").lstrip(),
    }
    text = TEMPLATE.read_text()
    for name, value in values.items():
        text = text.replace(f"@{name}@", str(value))
    left = re.findall(r"@[A-Z_]+@", text)
    if left:
        raise ValueError(f"{TEMPLATE}: no value for {', '.join(sorted(set(left)))}")
    return text


def access_logs(s: FrontSettings) -> str:
    """nginx's access_log lines: Kiln's access log, the spans log, both or neither."""
    lines = [access_log_rotation.nginx_directive(path, sampled_only)
             for path, sampled_only in ((s.access_log, False), (s.spans_log, True))
             if path is not None]
    return "\n    ".join(lines) or "access_log off;"


def written_logs(s: FrontSettings) -> list[Path]:
    return [path for path in (s.access_log, s.spans_log) if path is not None]


def supervisor_command(s: FrontSettings) -> list[str]:
    """nginx's supervisor (deploy/supervise.py), which also rotates the logs nginx writes."""
    command = [sys.executable, "-m", "kiln.deploy.supervise", "--nginx-dir", str(s.nginx_dir),
               "--quit-timeout", str(s.shutdown_s)]
    for path in written_logs(s):
        command += ["--access-log", str(path)]
    if written_logs(s):
        command += ["--access-log-max-bytes", str(s.access_log_max_bytes)]
    return command


def run_as_line() -> str:
    """nginx's `user` line: as root its workers would otherwise become nobody, who cannot read
    the run folder; as anyone else it needs none."""
    if os.geteuid() != 0:
        return ""
    import grp
    import pwd

    return f"user {pwd.getpwuid(os.geteuid()).pw_name} {grp.getgrgid(os.getegid()).gr_name};\n"


def nginx_command(s: FrontSettings, *args: str) -> list[str]:
    return [*supervise.nginx_command(s.nginx_dir), *args]


def prepare(s: FrontSettings, keys: list[Key]) -> None:
    """Everything nginx reads, written under its folder, which only its owner may enter (the
    keys list holds every key, the configuration TorchServe's token, the temporary folders
    request bodies); raises when nginx refuses it."""
    private_dir(s.nginx_dir)
    for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        private_dir(s.nginx_dir / sub)
    write_private(s.keys_list_file, keys_list(keys))
    write_private(s.conf, render(s))
    for path in written_logs(s):  # owner-only whatever nginx's umask (it appends to it)
        path.parent.mkdir(parents=True, exist_ok=True)
        access_log_rotation.create(path)
    done = subprocess.run(nginx_command(s, "-t", "-q"), capture_output=True, text=True)
    if done.returncode != 0:
        raise ValueError(f"nginx refuses {s.conf}:\n{done.stderr}")


# -- a front for `kiln serve` -------------------------------------------------------------------
class FrontError(RuntimeError):
    pass


class Front:
    """nginx in the background from `nginx_dir`, under Kiln's supervisor (deploy/supervise.py),
    outliving the command that started it (as TorchServe does); `kiln stop` finds both again
    by the folder, and ends any nginx process left of it."""

    def __init__(self, nginx_dir: Path, keys_file: Path):
        self.nginx_dir = nginx_dir
        self.keys_file = keys_file
        self.supervisor = Detached("nginx", nginx_dir / supervise.PID_FILE,
                                   nginx_dir / supervise.LOG_FILE, str(nginx_dir), FrontError)

    @property
    def conf(self) -> Path:
        return self.nginx_dir / "nginx.conf"

    def pid(self) -> int | None:
        """The master of this folder's nginx, if it runs."""
        return pid_from(self.nginx_dir / "nginx.pid", str(self.conf))

    def supervisor_pid(self) -> int | None:
        return self.supervisor.pid()

    def processes(self) -> list[psutil.Process]:
        """Every nginx process of this folder, a master's orphaned workers included: nginx
        runs with the folder as its working directory, which its workers inherit."""
        found = []
        for proc in psutil.process_iter(["name"]):
            if proc.info["name"] != "nginx":
                continue
            with contextlib.suppress(psutil.Error):
                if Path(proc.cwd()) == self.nginx_dir:
                    found.append(proc)
        return found

    def keys(self) -> list[Key]:
        """The keys file's keys; a new file with one new key when there is none (keys outlive
        restarts: a client's key still works after `kiln stop` and `kiln serve`)."""
        if self.keys_file.exists():
            return read_keys(self.keys_file)
        keys = [Key(new_key())]
        write_keys(self.keys_file, keys)
        return keys

    def start(self, settings: FrontSettings, timeout: float = 10) -> None:
        if (settings.nginx_dir, settings.keys_file) != (self.nginx_dir, self.keys_file):
            raise ValueError("settings for another front")
        if not os.access(NGINX, os.X_OK):
            raise FrontError(f"no {NGINX}: install Debian's nginx (Kiln's front proxy)")
        if self.pid() is not None:
            raise FrontError(f"an nginx already runs from {self.nginx_dir}")
        self.stop()  # a supervisor, or nginx processes, left of an earlier run: they hold ports
        try:
            prepare(settings, self.keys())
        except ValueError as err:  # KeysError included
            raise FrontError(str(err)) from None
        try:
            self.supervisor.start(supervisor_command(settings), timeout=timeout, ready=lambda: (
                self.pid() is not None and accepts(settings.listen, settings.public["http"])))
        except FrontError:
            self.stop()  # nginx processes its supervisor left
            raise

    def reload(self, timeout: float = 5) -> list[Key]:
        """Re-reads the keys file (raises on a bad one: nginx keeps what it has) and waits
        until nginx has taken it; no connection is closed."""
        keys = read_keys(self.keys_file)
        self._take(keys, timeout)
        return keys

    def apply(self, keys: list[Key], timeout: float = 5) -> None:
        """nginx takes `keys` first and the keys file says them after, so that a client that
        reads the file never holds a key nginx does not know yet (kiln keys rotate). Raises,
        changing nothing, when no master of this folder answers: a rotation nginx has not
        taken must not be reported done."""
        master = self.wait_master(timeout)
        if master is None:
            raise FrontError(self.not_running())
        self._take(keys, timeout)
        write_keys(self.keys_file, keys)

    @property
    def keys_list_file(self) -> Path:
        return self.nginx_dir / KEYS_LIST

    def wait_master(self, timeout: float) -> int | None:
        """The master's pid; while the supervisor runs, waits for the one it is starting."""
        deadline = time.monotonic() + timeout
        while (pid := self.pid()) is None and self.supervisor_pid() is not None \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        return pid

    def not_running(self) -> str:
        """Why no master of this folder can take a change, for the user."""
        left = self.processes()
        if left:
            return (f"the front proxy of {self.nginx_dir} has no master but {len(left)} nginx "
                    f"process(es) still answer (pids {', '.join(str(p.pid) for p in left)}), "
                    f"with the keys they had: kiln stop, then kiln serve")
        return f"no front proxy runs from {self.nginx_dir}"

    def _take(self, keys: list[Key], timeout: float) -> None:
        """The keys to nginx's keys list, then a wait until every worker serving has read it
        (each says the generation it holds in its keys.taken.PID): from then on no request is
        checked with the old keys. Workers shutting down after a reload keep theirs."""
        text = keys_list(keys)
        write_private(self.keys_list_file, text)
        wanted = generation(text)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            workers = self._serving_workers()
            if workers and all(self._taken(pid) == wanted for pid in workers):
                return
            time.sleep(0.01)
        raise FrontError(f"nginx did not take the keys within {timeout:g} s:\n"
                         f"{self.log_tail()}")

    def _serving_workers(self) -> list[int]:
        pid = self.pid()
        if pid is None:
            raise FrontError(self.not_running())
        workers = []
        with contextlib.suppress(psutil.Error):
            for proc in psutil.Process(pid).children():
                with contextlib.suppress(psutil.Error):
                    if "shutting down" not in " ".join(proc.cmdline()):
                        workers.append(proc.pid)
        return workers

    def _taken(self, worker: int) -> str | None:
        try:
            return (self.nginx_dir / f"{TAKEN_PREFIX}{worker}").read_text().strip()
        except OSError:
            return None

    def stop(self, timeout: float = 10) -> bool:
        """Graceful quit (requests in flight are answered), killed after `timeout`, and every
        nginx process of the folder ended; False when none ran."""
        master = self.pid()
        # The supervisor quits nginx gracefully, then kills what is left.
        stopped = self.supervisor.stop(timeout + 2)
        with contextlib.suppress(psutil.Error):
            if not stopped and master is not None:  # a master whose supervisor was killed
                proc = psutil.Process(master)
                tree = [proc, *proc.children()]
                proc.send_signal(signal.SIGQUIT)
                stopped = True
                alive = processes.wait_exited(tree, timeout)
                for p in alive:
                    with contextlib.suppress(psutil.Error):
                        p.kill()
        left = self.processes()  # orphaned workers of a master killed hard
        for proc in left:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        processes.wait_exited(left, 5)
        (self.nginx_dir / "nginx.pid").unlink(missing_ok=True)
        return stopped or bool(left)

    def log_tail(self, lines: int = 20) -> str:
        return self.supervisor.log_tail(lines)


def accepts(host: str, port: int) -> bool:
    """Whether something listens on host:port (a connect within 0.5 s)."""
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0
