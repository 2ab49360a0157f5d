"""Kiln's admin service: the version commands over HTTP, for `kiln serve --admin-port`.

    python -m kiln.deploy.admin_service --run-dir DIR --store DIR --socket PATH [--models-dir D]

The front proxy's admin server block (deploy/front.py) forwards the admin port to this
process's Unix socket, which only the run folder's owner (and so nginx) can reach. It checks
`Authorization: Bearer KEY` itself against run/admin_keys, read again whenever the file
changes: rotating or revoking an admin key needs no nginx reload (a reload can reset a
kept-alive client connection). An inference key is not in that file, so it is refused.

    GET  /models                    what `kiln models` lists, as JSON
    POST /models/NAME/ACTION        {"result": "..."}; ACTION and its JSON body in ACTIONS

Each action calls the function its local command calls (deploy/admin_actions.py). A refusal
is a 4xx with a short JSON error: 400 for bad arguments or an action versions.json refuses,
409 while another admin action holds its lock, 422 for one that could not be done (a deploy's
parity gate, TorchServe refusing). Every POST by a known key is one line of the owner-only
audit log (AUDIT_FILE): time, key id (its first SHOWN_CHARS characters, as `kiln keys
--admin list` shows it), action, arguments, status, outcome.

`AdminService` starts it detached (deploy/detached.py, as the metrics exporter is); `kiln
serve`, `kiln stop` and a crash's clean-up do so through Server.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hmac
import json
import logging
import os
import re
import socketserver
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from pathlib import Path

from kiln import declaration
from kiln.deploy import admin_actions, lifecycle, versions
from kiln.deploy.detached import (
    Detached,
    check_socket_path,
    serve_until_signalled,
    unix_accepts,
)
from kiln.keys import ADMIN_KEYS_FILE, SHOWN_CHARS, KeysError, read_keys

log = logging.getLogger("kiln.admin")

AUDIT_FILE = "admin_audit.log"
# An action's arguments are a few short fields; the front proxy refuses more first.
MAX_BODY = 16 * 1024
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
BEARER = re.compile(r"[Bb]earer ([A-Za-z0-9._~+/=-]+)")


class AdminServiceError(RuntimeError):
    pass


class BadRequest(ValueError):
    """An action's arguments are not what it takes: 400, nothing done."""


# -- the actions' arguments ---------------------------------------------------------------------
def _version(body: dict, required: bool = True) -> str | None:
    v = body.get("version")
    if v is None and not required:
        return None
    if not isinstance(v, str):
        raise BadRequest('"version" must be a string (say "2.0")')
    return versions.check_version_name(v)


def _number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"{what} must be a number")
    return float(value)


def _weights(body: dict) -> dict[str, float] | None:
    weights = body.get("weights")
    if weights is None:
        return None
    if not isinstance(weights, dict) or not weights:
        raise BadRequest('"weights" must be an object of version: percent, or null')
    return {str(v): _number(w, f"the weight of {v}") for v, w in weights.items()}


def _flag(body: dict, key: str) -> bool:
    value = body.get(key, False)
    if not isinstance(value, bool):
        raise BadRequest(f'"{key}" must be true or false')
    return value


def _backend(body: dict) -> str | None:
    backend = body.get("backend")
    if backend is not None and backend not in admin_actions.BACKENDS:
        raise BadRequest(f'"backend" must be one of {", ".join(admin_actions.BACKENDS)}')
    return backend


# ACTION: (the JSON fields it takes, how it is done given the service, the model and the body).
ACTIONS: dict[str, tuple[set[str], Callable]] = {
    "route": ({"weights"}, lambda s, name, b: admin_actions.route(s.run_dir, name, _weights(b))),
    "shadow": ({"version", "fraction"}, lambda s, name, b: admin_actions.shadow(
        s.run_dir, name, _version(b), _number(b.get("fraction"), '"fraction"'))),
    "promote": ({"version"}, lambda s, name, b: admin_actions.promote(
        s.run_dir, s.store, name, _version(b))),
    "rollback": (set(), lambda s, name, b: admin_actions.rollback(s.run_dir, s.store, name)),
    "retire": ({"version"}, lambda s, name, b: admin_actions.retire(
        s.run_dir, s.store, name, _version(b))),
    "deploy": ({"version", "backend", "allow_signature_change"},
               lambda s, name, b: admin_actions.deploy(
                   s.run_dir, s.store, name, s.models_dirs, _version(b, required=False),
                   _backend(b), _flag(b, "allow_signature_change"))),
}


def do_action(service: Service, name: str, action: str, body: dict) -> tuple[int, dict]:
    """(status, JSON answer) of one action; what is refused changes nothing."""
    fields, run = ACTIONS[action]
    unknown = sorted(set(body) - fields)
    try:
        if unknown:
            raise BadRequest(f"{action} takes no {', '.join(unknown)} (it takes: "
                             f"{', '.join(sorted(fields)) or 'nothing'})")
        return 200, {"result": run(service, name, body)}
    except versions.Busy as err:
        return 409, {"error": str(err)}
    except (BadRequest, versions.VersionsError, declaration.DeclarationError) as err:
        return 400, {"error": str(err)}
    except (lifecycle.LifecycleError, OSError) as err:
        return 422, {"error": str(err)}
    except Exception as err:  # an export, parity gate or archive that failed: nothing changed
        from kiln.model_store.archive import ArchiveError
        from kiln.training.export import ExportError, ParityError

        if not isinstance(err, (ArchiveError, ExportError, ParityError)):
            raise
        gate = "the parity gate failed: " if isinstance(err, ParityError) else ""
        return 422, {"error": f"{gate}{err}; nothing was deployed"}


# -- keys and audit -----------------------------------------------------------------------------
class AdminKeys:
    """run/admin_keys, read again when it changes (a rotation replaces it: another inode)."""

    def __init__(self, path: Path):
        self.path = path
        self._seen: tuple | None = None
        self._keys = []
        self._lock = threading.Lock()

    def _load(self) -> list:
        with self._lock:
            try:
                st = self.path.stat()
                stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
                if stamp != self._seen:
                    self._keys, self._seen = read_keys(self.path), stamp
            except (OSError, KeysError) as err:  # no file, or none valid: nobody is let in
                log.warning("admin keys: %s", err)
                self._keys, self._seen = [], None
            return self._keys

    def check(self, authorization: str | None) -> str | None:
        """The id of the valid admin key the header carries, else None."""
        match = BEARER.fullmatch(authorization or "")
        if match is None:
            return None
        given, now = match.group(1).encode(), time.time()
        for key in self._load():
            # Every key is compared, in constant time: how long a refusal takes says nothing.
            if hmac.compare_digest(key.value.encode(), given) and key.valid_at(now):
                return key_id(key.value)
        return None


def key_id(value: str) -> str:
    return value[:SHOWN_CHARS]


def audit(path: Path, key: str, action: str, name: str, body: dict, status: int,
          outcome: str) -> None:
    """One JSON line appended to the owner-only audit log."""
    line = json.dumps({"time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
                       "key": key, "action": action, "model": name, "arguments": body,
                       "status": status, "outcome": outcome})
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a") as out:
        out.write(line + "\n")


# -- the HTTP service ---------------------------------------------------------------------------
class _Handler(BaseHTTPRequestHandler):
    server: Service

    def do_GET(self):  # noqa: N802 (http.server's name)
        if self._key() is None:
            return
        if self.path != "/models":
            self._no_route()
            return
        try:
            self._answer(200, admin_actions.models(self.server.run_dir, self.server.store))
        except (versions.VersionsError, lifecycle.LifecycleError, OSError) as err:
            self._answer(422, {"error": str(err)})

    def do_POST(self):  # noqa: N802
        key = self._key()
        if key is None:
            return
        parts = self.path.split("/")
        if (len(parts) != 4 or parts[:2] != ["", "models"] or not NAME.fullmatch(parts[2])
                or parts[3] not in ACTIONS):
            self._no_route()
            return
        body = self._body()
        if body is None:
            return
        status, answer = do_action(self.server, parts[2], parts[3], body)
        audit(self.server.audit_file, key, parts[3], parts[2], body, status,
              answer.get("result") or answer["error"])
        self._answer(status, answer)

    def do_PUT(self):  # noqa: N802
        self._refuse_method()

    do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_PUT  # noqa: N815

    def _refuse_method(self):
        if self._key() is not None:
            self._answer(405, {"error": f"{self.command} is not an admin method: GET /models, "
                                        f"POST /models/NAME/ACTION"})

    def _key(self) -> str | None:
        """The admin key's id; None once a 401 has been answered."""
        key = self.server.keys.check(self.headers.get("Authorization"))
        if key is None:
            self._answer(401, {"error": "missing or unknown admin key"})
        return key

    def _no_route(self):
        self._answer(404, {"error": f"no admin route {self.command} {self.path[:200]}: "
                                    f"GET /models, POST /models/NAME/{{{','.join(ACTIONS)}}}"})

    def _body(self) -> dict | None:
        """The request's JSON object; None once a 4xx has been answered."""
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY:
            self._answer(413 if length > MAX_BODY else 400,
                         {"error": f"the body must have a Content-Length of at most "
                                   f"{MAX_BODY} bytes"})
            return None
        raw = self.rfile.read(length) if length else b"{}"
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            self._answer(400, {"error": "the body must be a JSON object"})
            return None
        return body

    def _answer(self, status: int, answer: dict) -> None:
        data = (json.dumps(answer) + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def address_string(self):  # a Unix socket's peer has no address
        return "unix"

    def log_message(self, format, *args):  # noqa: A002 (the audit log says what counts)
        pass


class Service(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, socket_path: Path, run_dir: Path, store: Path, models_dirs: list[Path]):
        self.run_dir, self.store, self.models_dirs = run_dir, store, models_dirs
        self.keys = AdminKeys(run_dir / ADMIN_KEYS_FILE)
        self.audit_file = run_dir / AUDIT_FILE
        socket_path.unlink(missing_ok=True)  # a socket file a killed service left
        super().__init__(str(socket_path), _Handler)


def serve(socket_path: Path, run_dir: Path, store: Path, models_dirs: list[Path]) -> None:
    """Serves until SIGTERM or SIGINT."""
    os.umask(0o077)  # its socket and audit log are the run folder owner's alone
    server = Service(socket_path, run_dir, store, models_dirs)
    log.info("admin service for %s on %s", run_dir, socket_path)
    serve_until_signalled(server, socket_path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", type=Path, required=True, help="kiln serve's run folder")
    p.add_argument("--store", type=Path, required=True, help="the model store it serves from")
    p.add_argument("--socket", type=Path, required=True, help="the Unix socket to serve on")
    p.add_argument("--models-dir", type=Path, action="append", default=[], dest="models_dirs",
                   help="where declarations are found besides Kiln's own (repeatable)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                                                   "%(message)s")
    serve(args.socket, args.run_dir.resolve(), args.store.resolve(), args.models_dirs)
    return 0


# -- its lifecycle --------------------------------------------------------------------------------
class AdminService:
    """The admin service of one run folder: its socket, pid file and log."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.socket = run_dir / "kiln-admin.sock"
        self.keys_file = run_dir / ADMIN_KEYS_FILE
        self.process = Detached("Kiln's admin service", run_dir / "kiln-admin.pid",
                                run_dir / "kiln-admin.log", str(self.socket), AdminServiceError)

    def pid(self) -> int | None:
        return self.process.pid()

    def start(self, store: Path, models_dirs: list[Path], timeout: float = 10,
              console: bool = False) -> None:
        """Answering when this returns."""
        check_socket_path(self.socket, AdminServiceError)
        self.stop()
        command = [sys.executable, "-m", "kiln.deploy.admin_service", "--run-dir",
                   str(self.run_dir), "--store", str(store.resolve()), "--socket",
                   str(self.socket), *[a for d in models_dirs
                                       for a in ("--models-dir", str(Path(d).resolve()))]]
        self.process.start(command, lambda: unix_accepts(self.socket), timeout, console)

    def stop(self, timeout: float = 5) -> bool:
        """SIGTERM, killed after `timeout`; False when none ran."""
        if not self.process.stop(timeout):
            return False
        self.socket.unlink(missing_ok=True)
        return True


if __name__ == "__main__":
    raise SystemExit(main())
