"""kiln-container: the entrypoint of Kiln's serving container (docs/deploy.md is the contract).

It starts TorchServe (loopback only, its token auth off, logs on stdout) and nginx in front of
it (every public port, the keys, the probes), hands nginx the mounted keys file's keys when it
changes (no reload: its workers read them again), and turns SIGTERM into a drain: readiness
false at once, the drain delay, nginx's graceful quit (requests in flight are answered), then
TorchServe and its workers stopped, exit 0, all within the grace period. TorchServe has no
drain of its own: its shutdown closes channels at once.

It reaps orphans (a child subreaper on Linux, or PID 1 itself), so TorchServe's frontend, which
its launcher leaves behind, and any worker that outlives the frontend stay in its process tree.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import requests

from kiln.declaration import DeclarationError
from kiln.deploy import access_log, contract, front, lifecycle, metrics_exporter, versions
from kiln.deploy.front import FrontSettings, KeysError, parse_keys
from kiln.deploy.server import (
    CONSOLE_LOG_CONFIG,
    HOST,
    ModelServing,
    Ports,
    Server,
    ServerError,
    ServerSettings,
    declared_serving,
)
from kiln.handlers import tracing
from kiln.handlers.cores import usable_cores
from kiln.handlers.payload_log import check_fraction

log = logging.getLogger("kiln.container")

KEYS_POLL_S = 1.0
# Before the versions a versions file records are registered: the models' first load.
MODELS_READY_TIMEOUT_S = 180
READY_POLL_S = 0.1
EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2
PR_SET_CHILD_SUBREAPER = 36
# Flag files in the run folder that nginx's readiness checks.
DRAINING_FLAG = "draining"  # written on SIGTERM: readiness false from that moment

# Optional settings the image leaves unset (contract.ENV's are all set there): yes/no, and
# what a yes may say.
ACCESS_LOG_ENV = "KILN_ACCESS_LOG"
TRUE = ("1", "true", "yes", "on")

@dataclass(frozen=True)
class Settings:
    model_store: Path = Path(contract.MODEL_STORE)
    models: tuple[str, ...] = ()  # empty: every archive in the store
    keys_file: Path = Path(contract.KEYS_FILE)
    run_dir: Path = Path(contract.RUN_DIR)
    grace_s: float = 30.0
    drain_delay_s: float = 5.0
    java_heap: str = "1g"
    versions_file: Path = Path(contract.VERSIONS_FILE)
    listen: str = "0.0.0.0"
    # Added to every public and internal port: side-by-side copies on one host (tests).
    port_offset: int = 0
    public: Mapping[str, int] = field(default_factory=lambda: dict(contract.PUBLIC_PORTS))
    internal: Ports = contract.INTERNAL_PORTS
    # The sampled payload log (kiln serve --payload-log), in run_dir/torchserve/payloads/.
    payload_log: float = 0.0
    access_log: bool = False  # Kiln's JSON access log (deploy/access_log.py)
    otlp_endpoint: str | None = None  # spans over OTLP/HTTP (kiln.handlers.tracing)

    def __post_init__(self):
        if self.grace_s <= 0 or self.drain_delay_s < 0:
            raise ValueError("the grace period must be > 0 and the drain delay >= 0 seconds")
        check_fraction(self.payload_log)
        if self.drain_delay_s >= self.grace_s:
            raise ValueError(f"the drain delay ({self.drain_delay_s:g} s) must be shorter than "
                             f"the grace period ({self.grace_s:g} s)")
        ports = [*self.public.values(), *vars(self.internal).values()]
        if not all(0 < p + self.port_offset < 65536 for p in ports):
            raise ValueError(f"port offset {self.port_offset} puts a port outside 1-65535")

    def public_ports(self) -> dict[str, int]:
        return {name: port + self.port_offset for name, port in self.public.items()}

    def internal_ports(self) -> Ports:
        return Ports(**{k: v + self.port_offset for k, v in vars(self.internal).items()})

    def served_models(self) -> list[str]:
        if self.models:
            return list(self.models)
        return sorted(p.stem for p in self.model_store.glob("*.mar"))

    def stop_reserve_s(self) -> float:
        """Of the grace period, what is kept for stopping TorchServe after nginx's quit."""
        return min(10.0, (self.grace_s - self.drain_delay_s) / 3)


# -- settings -------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Flags win over the environment (contract.ENV), which wins over contract's defaults."""
    env = os.environ if environ is None else environ
    d = Settings()

    def default(key: str, fallback):
        return env.get(contract.ENV[key]) or fallback

    p = argparse.ArgumentParser(prog="kiln-container", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=default("models", ""),
                   help=f"comma-separated model names (env {contract.ENV['models']}; "
                        f"default: every .mar in the store)")
    p.add_argument("--model-store", type=Path, default=Path(default("model_store", d.model_store)),
                   help=f"env {contract.ENV['model_store']} (default {d.model_store})")
    p.add_argument("--keys-file", type=Path, default=Path(default("keys_file", d.keys_file)),
                   help=f"one key per line, # comments (env {contract.ENV['keys_file']}; "
                        f"default {d.keys_file})")
    p.add_argument("--run-dir", type=Path, default=Path(default("run_dir", d.run_dir)),
                   help=f"writable folder (env {contract.ENV['run_dir']}; default {d.run_dir})")
    p.add_argument("--grace-seconds", type=float, default=float(default("grace_s", d.grace_s)),
                   help=f"SIGTERM to exit, at most (env {contract.ENV['grace_s']}; "
                        f"default {d.grace_s:g})")
    p.add_argument("--drain-delay-seconds", type=float,
                   default=float(default("drain_delay_s", d.drain_delay_s)),
                   help=f"readiness false before listeners close (env "
                        f"{contract.ENV['drain_delay_s']}; default {d.drain_delay_s:g})")
    p.add_argument("--java-heap", default=default("java_heap", d.java_heap),
                   help=f"TorchServe's -Xmx (env {contract.ENV['java_heap']}; "
                        f"default {d.java_heap})")
    p.add_argument("--versions-file", type=Path,
                   default=Path(default("versions_file", d.versions_file)),
                   help=f"versions.json: versions, routes and shadows, read when present (env "
                        f"{contract.ENV['versions_file']}; default {d.versions_file})")
    p.add_argument("--payload-log", type=float, metavar="FRACTION",
                   default=float(default("payload_log", d.payload_log)),
                   help=f"fraction of requests whose body and answer are logged, 0 to 1 (env "
                        f"{contract.ENV['payload_log']}; default {d.payload_log:g}: off)")
    p.add_argument("--access-log", action="store_true",
                   default=env.get(ACCESS_LOG_ENV, "").lower() in TRUE,
                   help=f"Kiln's JSON access log, one line per request, in the run folder (env "
                        f"{ACCESS_LOG_ENV}=1; default: off)")
    p.add_argument("--otlp-endpoint", metavar="URL",
                   default=env.get(tracing.ENDPOINT_ENV) or None,
                   help=f"the proxy's and the handler's spans over OTLP/HTTP (env "
                        f"{tracing.ENDPOINT_ENV}; default: none)")
    p.add_argument("--listen", default=d.listen,
                   help=f"address of the public listeners (default {d.listen})")
    p.add_argument("--port-offset", type=int, default=0,
                   help="added to every public and internal port, for side-by-side copies on "
                        "one host (default 0: the contract's ports)")
    args = p.parse_args(argv)
    try:
        return Settings(model_store=args.model_store,
                        models=tuple(m.strip() for m in args.models.split(",") if m.strip()),
                        keys_file=args.keys_file, run_dir=args.run_dir,
                        grace_s=args.grace_seconds, drain_delay_s=args.drain_delay_seconds,
                        java_heap=args.java_heap, versions_file=args.versions_file,
                        listen=args.listen,
                        port_offset=args.port_offset, payload_log=args.payload_log,
                        access_log=args.access_log, otlp_endpoint=args.otlp_endpoint)
    except ValueError as err:
        p.error(str(err))


def server_settings(settings: Settings) -> ServerSettings:
    """TorchServe as the container runs it: loopback ports, token auth off (nginx checks keys),
    logs on stdout, everything it writes in the run folder."""
    models = settings.served_models()
    # Derived from the cores the container may use (its --cpus quota, not the host's).
    defaults = ModelServing.derived(usable_cores(), max(1, len(models)))
    serving = {}
    for name in models:
        try:
            serving[name] = declared_serving(name, defaults=defaults)
        except DeclarationError:  # a user's model whose declaration is not in the image
            log.info("%s: no declaration here; served with Kiln's defaults %s", name,
                     defaults)
            serving[name] = defaults
    return ServerSettings(run_dir=settings.run_dir / "torchserve",
                          model_store=settings.model_store, models=models,
                          ports=settings.internal_ports(), java_heap=settings.java_heap,
                          log_config=CONSOLE_LOG_CONFIG, serving=serving, token_auth=False,
                          console_logs=True, versions_file=settings.versions_file,
                          # On loopback only: the recorded versions are registered through it.
                          enable_model_api=settings.versions_file.exists(),
                          payload_log=settings.payload_log,
                          access_log=settings.access_log, otlp_endpoint=settings.otlp_endpoint)


# -- nginx ----------------------------------------------------------------------------------------
def front_settings(settings: Settings, server: ServerSettings, run_dir: Path) -> FrontSettings:
    public, internal = settings.public_ports(), server.ports
    return FrontSettings(
        nginx_dir=run_dir / "nginx", keys_file=settings.keys_file, listen=settings.listen,
        public=public,
        upstream={"http": internal.inference, "oip": internal.oip,
                  "grpc": internal.kiln_grpc, "oip-grpc": internal.oip_grpc,
                  "metrics": internal.metrics},
        max_body=server.max_request_size, ready_path=contract.READY_PATH,
        live_path=contract.LIVE_PATH, draining_flag=run_dir / DRAINING_FLAG,
        route_state=server.state_file(),
        shutdown_s=max(1, int(settings.grace_s - settings.drain_delay_s
                              - settings.stop_reserve_s())),
        run_as=front.run_as_line(),
        kiln_metrics_socket=metrics_exporter.Exporter(server.run_dir.resolve()).socket,
        access_log=front.access_log_path(server.run_dir) if server.access_log else None,
        spans_log=front.spans_log_path(server.run_dir) if server.otlp_endpoint else None)


def nginx_config(settings: Settings, server: ServerSettings, run_dir: Path) -> str:
    return front.render(front_settings(settings, server, run_dir))


def set_subreaper() -> None:
    """Orphans of this process's tree become its children (Linux), so it can reap and stop
    them; as PID 1 it is so already."""
    if os.getpid() == 1 or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        log.warning("could not become a child subreaper (errno %d): run under an init such "
                    "as tini", ctypes.get_errno())


def wait_models_ready(server: Server, oip_url: str, timeout: float) -> None:
    """Until the OIP plugin says every model TorchServe started with has a loaded worker."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.pid() is None:
            raise ServerError("TorchServe exited during start-up (its log is above)")
        with contextlib.suppress(requests.RequestException):
            if requests.get(f"{oip_url}/v2/health/ready", timeout=5).status_code == 200:
                return
        time.sleep(READY_POLL_S)
    raise ServerError(f"TorchServe's models were not ready within {timeout:g} s")


# -- the entrypoint -------------------------------------------------------------------------------
class Entrypoint:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.run_dir = settings.run_dir.resolve()
        self.draining_flag = self.run_dir / DRAINING_FLAG
        self.server = Server(server_settings(replace(settings, run_dir=self.run_dir)))
        self.front = front_settings(settings, self.server.settings, self.run_dir)
        self.signalled: int | None = None
        self.nginx: subprocess.Popen | None = None  # kept: a dropped Popen may reap it
        self.nginx_pid: int | None = None
        self.frontend_pid: int | None = None
        self.exited: dict[int, int] = {}  # pid -> wait status, of the children reaped
        self.keys_text: str | None = None
        self.rotations = [access_log.Rotation(path) for path in front.written_logs(self.front)]

    def _on_signal(self, signum, _frame):
        if self.signalled is None:
            self.signalled = signum
            # Readiness false now, not at the main loop's next turn.
            with contextlib.suppress(OSError):
                self.draining_flag.touch()

    # -- start -------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Everything nginx and TorchServe read, written under the run folder; raises on bad
        keys or a configuration nginx refuses."""
        self.draining_flag.unlink(missing_ok=True)
        self.keys_text = self.settings.keys_file.read_text()
        keys = parse_keys(self.keys_text, str(self.settings.keys_file))
        front.prepare(self.front, keys)
        log.info("%d key(s) from %s", len(keys), self.settings.keys_file)

    def start(self) -> None:
        self.server.start()
        self.frontend_pid = self.server.pid()
        if self.frontend_pid is None:
            raise ServerError("TorchServe's frontend exited at once (its log is above)")
        # In a session of its own, like TorchServe: only this process decides when it stops.
        self.nginx = subprocess.Popen(front.nginx_command(self.front), stdin=subprocess.DEVNULL,
                                      start_new_session=True)
        self.nginx_pid = self.nginx.pid
        if self.server.settings.otlp_endpoint:
            self.server.proxy_spans.start(console=True)
        self.restore_versions()
        public = self.settings.public_ports()
        log.info("serving %s: http %d, oip %d, grpc %d, oip-grpc %d, metrics %d; probes %s "
                 "and %s", ", ".join(self.server.settings.models), public["http"],
                 public["oip"], public["grpc"], public["oip-grpc"], public["metrics"],
                 contract.READY_PATH, contract.LIVE_PATH)

    def restore_versions(self) -> None:
        """The versions the mounted versions file records registered (their NAME-V.mar in the
        store) and warmed, and its defaults set, through TorchServe's model API on loopback;
        /ready says no meanwhile (the draining flag), so no client is sent to a version not
        yet registered. Routes and shadows need nothing here: the OIP plugin and nginx read
        the file itself, at each change."""
        state = versions.read(self.settings.versions_file)
        served = [name for name in state if name in self.server.settings.models]
        if not served:
            return
        self.draining_flag.touch()
        ports = self.server.settings.ports
        wait_models_ready(self.server, f"http://{HOST}:{ports.oip}", MODELS_READY_TIMEOUT_S)
        target = lifecycle.Target(
            self.run_dir, self.settings.model_store,
            lifecycle.Management(f"http://{HOST}:{ports.management}", token=""),
            f"http://{HOST}:{ports.inference}", "", f"http://{HOST}:{ports.oip}")
        for name in served:
            try:
                done = lifecycle.restore(target, name, state)
            except (ValueError, RuntimeError, KeyError, requests.RequestException) as err:
                raise ServerError(f"{name}'s versions in {self.settings.versions_file}: "
                                  f"{err}") from None
            for line in done:
                log.info("%s", line)
        if self.signalled is None:
            self.draining_flag.unlink(missing_ok=True)

    # -- while serving -----------------------------------------------------------------------
    def reap(self) -> None:
        """Collect every child that has exited (orphans this process adopted included)."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.exited[pid] = status

    def died(self) -> str | None:
        for name, pid in (("nginx", self.nginx_pid), ("TorchServe", self.frontend_pid)):
            if pid in self.exited:
                return f"{name} (pid {pid}) exited with status {self.exited[pid]}"
        return None

    def check_keys(self) -> None:
        """Hand nginx the keys file's keys when it changed; keep the ones it has if the file is
        not valid (a key too short, a half-written file)."""
        try:
            text = self.settings.keys_file.read_text()
        except OSError as err:
            text = None
            if self.keys_text is not None:
                log.error("cannot read %s (%s): keeping the %s", self.settings.keys_file, err,
                          "keys loaded before")
        if text is None or text == self.keys_text:
            return
        self.keys_text = text
        try:
            keys = parse_keys(text, str(self.settings.keys_file))
        except KeysError as err:
            log.error("%s: keeping the keys loaded before", err)
            return
        # nginx's workers read it again within front.KEYS_POLL_S: no reload.
        front.write_private(self.front.keys_list_file, front.keys_list(keys))
        log.info("keys changed: nginx takes %d key(s)", len(keys))

    def serve(self) -> str | None:
        """Until a signal (None) or a child's unexpected exit (what happened)."""
        next_keys_check = time.monotonic() + KEYS_POLL_S
        while self.signalled is None:
            self.reap()
            died = self.died()
            if died:
                return died
            for rotation in self.rotations:
                rotation.check(self.nginx_pid)
            if time.monotonic() >= next_keys_check:
                self.check_keys()
                next_keys_check = time.monotonic() + KEYS_POLL_S
            time.sleep(0.1)
        return None

    # -- stop --------------------------------------------------------------------------------
    def wait_for(self, pid: int, deadline: float) -> bool:
        while time.monotonic() < deadline:
            self.reap()
            if pid in self.exited:
                return True
            time.sleep(0.05)
        return False

    def drain(self) -> bool:
        """SIGTERM's drain, all within the grace period; True when nothing had to be killed."""
        s = self.settings
        began = time.monotonic()
        deadline = began + s.grace_s
        self.draining_flag.touch()
        log.info("%s: draining; readiness is false, listeners close in %g s",
                 signal.Signals(self.signalled).name, s.drain_delay_s)
        end_of_delay = began + s.drain_delay_s
        while time.monotonic() < end_of_delay and not self.died():
            self.reap()
            time.sleep(0.05)
        clean = True
        if self.nginx_pid not in self.exited:
            os.kill(self.nginx_pid, signal.SIGQUIT)  # graceful: answer what is in flight
            if not self.wait_for(self.nginx_pid, deadline - s.stop_reserve_s()):
                log.warning("nginx still draining at the end of its share of the grace "
                            "period: stopping it")
                os.kill(self.nginx_pid, signal.SIGKILL)
                self.wait_for(self.nginx_pid, deadline)
                clean = False
        log.info("nginx stopped after %.1f s; stopping TorchServe", time.monotonic() - began)
        clean &= self.stop_torchserve(deadline)
        log.info("stopped %.1f s after %s", time.monotonic() - began,
                 signal.Signals(self.signalled).name)
        return clean

    def stop_torchserve(self, deadline: float) -> bool:
        self.server.proxy_spans.stop()  # nginx has stopped: its last lines are sent
        clean = self.server.terminate(timeout=max(0.5, deadline - time.monotonic()))
        self.reap()
        return clean and not self.leftovers(deadline)

    def leftovers(self, deadline: float) -> list[int]:
        """Children still running (a worker of a frontend killed hard): stopped, then killed."""
        import psutil

        kids = psutil.Process().children(recursive=True)
        for proc in kids:
            proc.terminate()
        _, alive = psutil.wait_procs(kids, timeout=max(0.1, deadline - time.monotonic()))
        for proc in alive:
            proc.kill()
        psutil.wait_procs(alive, timeout=2)
        self.reap()
        if kids:
            log.warning("stopped %d process(es) left behind: %s", len(kids),
                        ", ".join(str(p.pid) for p in kids))
        return [p.pid for p in alive]

    def shutdown_after(self, died: str) -> None:
        """A child exited unexpectedly: stop the other at once (the orchestrator restarts)."""
        log.error("%s: stopping the container", died)
        self.draining_flag.touch()
        deadline = time.monotonic() + self.settings.grace_s
        if self.nginx_pid in self.exited:
            # Its workers outlive a master killed hard and keep answering with the keys they
            # hold, which no reload reaches any more: they go at once (their process group).
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.nginx_pid, signal.SIGKILL)
        else:
            os.kill(self.nginx_pid, signal.SIGTERM)  # fast: without TorchServe nothing answers
            self.wait_for(self.nginx_pid, deadline)
        self.stop_torchserve(deadline)

    def run(self) -> int:
        set_subreaper()
        os.umask(0o077)  # the run folder's files (nginx's configuration and keys list) are private
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        try:
            self.prepare()
        except (OSError, ValueError) as err:
            log.error("%s", err)
            return EXIT_CONFIG
        try:
            self.start()
        except (ServerError, OSError) as err:
            log.error("%s", err)
            self.stop_torchserve(time.monotonic() + self.settings.grace_s)
            return EXIT_FAILED
        died = self.serve()
        if died:
            self.shutdown_after(died)
            return EXIT_FAILED
        return EXIT_OK if self.drain() else EXIT_FAILED


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s kiln-container %(levelname)s %(message)s")
    return Entrypoint(parse_args(argv)).run()


if __name__ == "__main__":
    sys.exit(main())
