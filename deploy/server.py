"""Start, wait for and stop a local TorchServe serving Kiln's archives.

Every instance lives in its own run folder (config.properties, logs, the key file, and the
pid file TorchServe keeps in $TMPDIR), so `make serve` and the integration tests' servers
never step on each other.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

from kiln.deploy import (
    admin_service,
    front,
    logs,
    metrics_exporter,
    orphans,
    plugins,
    processes,
    readiness,
)
from kiln.deploy.detached import pid_from
from kiln.deploy.owner_only import owner_only, owner_only_files

# What callers import from here besides Server: the settings, ports and serving policy that
# a server is made of live in their own modules (ports, serving, torchserve_config).
from kiln.deploy.ports import (  # noqa: F401
    FRONTEND_CLASS,
    HOST,
    INTERNAL_PORTS_FILE,
    PORTS_FILE,
    Ports,
    run_dirs_on,
)
from kiln.deploy.proxy_spans import ProxySpans
from kiln.deploy.serving import (  # noqa: F401
    BATCH_PER_MODEL,
    MAX_BATCH_DELAY_MS,
    MIN_BATCH,
    SHADOWING_KEYS,
    ModelServing,
    declared_serving,
)
from kiln.deploy.torchserve_config import (  # noqa: F401
    CONSOLE_LOG_CONFIG,
    LOG_CONFIG,
    ServerError,
    ServerSettings,
)
from kiln.handlers import payload_log, tracing, watch
from kiln.keys import KEYS_FILE
from kiln.model_store import read_archive

log = logging.getLogger("kiln.serve")

# On the PYTHONPATH of TorchServe's processes: defers torch in its workers.
WORKER_SITE = LOG_CONFIG.with_name("worker_site")
# Probes the front proxy answers on the inference port without a key.
READY_PATH = "/ready"
LIVE_PATH = "/live"
# How often wait_ready asks: a poll is a few local requests (about 1 ms each) to the
# management API, and half a second of polling was up to half a second of `kiln serve`.
READY_POLL_S = 0.05


class Server:
    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.run_dir = settings.run_dir.resolve()
        self.ports = settings.ports
        self.front = front.Front(self.run_dir / "nginx", self.run_dir / KEYS_FILE)
        # The handlers' metrics, and the default versions versions.json records.
        self.exporter = metrics_exporter.Exporter(self.run_dir, settings.state_file())
        # The front proxy's spans (deploy/proxy_spans.py), with an OTLP endpoint.
        self.proxy_spans = ProxySpans(self.run_dir, front.spans_log_path(self.run_dir),
                                      settings.otlp_endpoint or "")
        self.admin = admin_service.AdminService(self.run_dir)

    # -- paths and environment -------------------------------------------------------------
    @property
    def config_file(self) -> Path:
        return self.run_dir / "config.properties"

    @property
    def key_file(self) -> Path:
        return self.run_dir / "key_file.json"

    @property
    def log_dir(self) -> Path:
        return self.run_dir / "logs"

    @property
    def access_log(self) -> Path:
        """Kiln's JSON access log, written by the front proxy (kiln serve --access-log)."""
        return front.access_log_path(self.run_dir)

    @property
    def fronted(self) -> bool:
        return self.settings.internal_ports is not None

    def torchserve_access_log(self) -> bool:
        """TorchServe's own access log: asked for, and no Kiln front proxy writes Kiln's JSON
        one (kiln serve's, or the container's, which checks the keys: TorchServe's tokens
        off). Behind the proxy TorchServe's line says nothing the JSON one does not (its
        client is always the proxy) and was a second log write a request."""
        return self.settings.access_log and not self.fronted and self.settings.token_auth

    def _env(self) -> dict[str, str]:
        tmp = self.run_dir / "tmp"
        env = dict(os.environ)
        # TorchServe keeps its pid file in tempfile.gettempdir(): one per run folder.
        env.update(TMPDIR=str(tmp), TEMP=str(tmp), LOG_LOCATION=str(self.log_dir),
                   METRICS_LOCATION=str(self.log_dir),
                   KILN_ACCESS_LOG="info" if self.torchserve_access_log() else "off",
                   KILN_SERVED_WORKERS=str(self.served_workers()),
                   PROMETHEUS_MULTIPROC_DIR=str(self.exporter.folder))
        s = self.settings
        env[watch.OFF_ENV] = "on" if s.watch else "off"
        env[watch.DELAY_ENV] = str(s.watch_delay_ms)
        env[watch.DRIFT_RATE_ENV] = str(s.drift_rows_per_s)
        env.update(payload_log.worker_env(s.payload_log, s.payload_dir(), s.payload_log_max_bytes,
                                          s.payload_log_files))
        # The handler's spans go where the proxy's do, or nowhere.
        env.pop(tracing.ENDPOINT_ENV, None)
        if self.settings.otlp_endpoint:
            env[tracing.ENDPOINT_ENV] = self.settings.otlp_endpoint
        # Workers must find the same Python (and its packages) as this process.
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        # Workers import torch on first use only (an ONNX worker never does: faster to ready,
        # lighter); see worker_site/sitecustomize.py.
        site = str(WORKER_SITE) if self.settings.worker_site else None
        env["PYTHONPATH"] = os.pathsep.join(p for p in (site, env.get("PYTHONPATH")) if p)
        return env

    def served_workers(self) -> int:
        try:
            return self.settings.served_workers()
        except ValueError:  # `start` has refused these settings already; `stop` needs none
            return max(1, len(self.settings.models))

    def _torchserve(self, *args: str, timeout: float) -> tuple[int, str]:
        """Run the torchserve launcher; its output goes to a file, not a pipe, because the
        Java server it spawns inherits the launcher's streams and would hold a pipe open."""
        exe = Path(sys.executable).with_name("torchserve")
        if self.settings.console_logs:
            # A session of its own, which Java inherits: a signal to the caller's process group
            # (Ctrl-C, timeout(1)) must not stop TorchServe behind the caller's back.
            code = subprocess.run([str(exe), *args], cwd=self.run_dir, env=self._env(),
                                  stdin=subprocess.DEVNULL, timeout=timeout,
                                  start_new_session=True).returncode
            return code, "(the launcher's output is above, on stdout)"
        out_path = self.log_dir / "launcher.out"
        with open(out_path, "a") as out:
            code = subprocess.run([str(exe), *args], cwd=self.run_dir, env=self._env(),
                                  stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                  timeout=timeout).returncode
        return code, out_path.read_text(errors="replace")[-4000:]

    # -- lifecycle -------------------------------------------------------------------------
    @property
    def pid_file(self) -> Path:
        return self.run_dir / "tmp" / ".model_server.pid"

    def pid(self) -> int | None:
        """The frontend of this run folder, if one runs: the pid in its pid file, and that
        process a TorchServe frontend (a pid of a dead server may belong to anything now)."""
        return pid_from(self.pid_file, FRONTEND_CLASS)

    def orphan_workers(self) -> list[psutil.Process]:
        """Workers of this run folder whose frontend is gone (deploy/orphans.py)."""
        return orphans.orphan_workers(self.run_dir, self.pid())

    def clean_up_after_crash(self) -> list[str]:
        """What a dead frontend left behind (pid file, key file, orphan workers), removed;
        one line each, for the user."""
        if self.pid() is not None:
            return []
        done = []
        if self.front.stop():
            done.append("stopped the front proxy (nginx) of a TorchServe that is gone")
        if self.exporter.stop():
            done.append("stopped Kiln's metrics exporter of a TorchServe that is gone")
        if self.proxy_spans.stop():
            done.append("stopped Kiln's proxy spans of a TorchServe that is gone")
        if self.admin.stop():
            done.append("stopped Kiln's admin service of a TorchServe that is gone")
        (self.run_dir / INTERNAL_PORTS_FILE).unlink(missing_ok=True)
        if self.pid_file.exists():
            self.pid_file.unlink(missing_ok=True)
            done.append(f"removed the pid file of a TorchServe that is gone ({self.pid_file})")
            if self.key_file.exists():
                self.key_file.unlink(missing_ok=True)
                done.append(f"removed its key file ({self.key_file}): its tokens died with it")
        left = self.orphan_workers()
        orphans.end(left)
        if left:
            done.append(f"stopped {len(left)} orphan worker(s) of it: pids "
                        f"{', '.join(str(p.pid) for p in left)}")
        for line in done:
            log.warning("%s: %s", self.run_dir, line)
        return done

    def start(self) -> None:
        """TorchServe, its metrics exporter and, when fronted, the front proxy, each writing
        only owner-only files into a run folder that only its owner may enter: keys, tokens
        and what derives from them (nginx's configuration and keys list, TorchServe's key
        file, logs that may quote a request) are nobody else's (umask 077 for them all)."""
        with owner_only_files():
            self._start()

    def _start(self) -> None:
        if shutil.which("java") is None:
            raise ServerError("no Java runtime on PATH: install openjdk-17-jre-headless")
        if self.settings.otlp_endpoint and not tracing.sdk_present():
            raise ServerError(tracing.MISSING_EXTRA)
        if self.pid() is not None:
            raise ServerError(f"a TorchServe already runs from {self.run_dir} (kiln stop)")
        self.clean_up_after_crash()
        owner_only(self.run_dir)
        for m in self.settings.models:
            mar = self.settings.model_store / f"{m}.mar"
            if not mar.exists():
                raise ServerError(f"no archive {m}.mar in {self.settings.model_store}: "
                                  f"run kiln archive {m}")
            shadowing = sorted(set(read_archive(mar)[1] or {}) & set(SHADOWING_KEYS))
            if shadowing:
                log.warning("%s carries %s, which win over kiln serve's settings: rebuild it "
                            "with kiln archive %s", mar, ", ".join(shadowing), m)
        try:
            plugins.ensure_built()
        except plugins.PluginError as err:
            raise ServerError(str(err)) from None
        (self.run_dir / "tmp").mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.key_file.unlink(missing_ok=True)
        try:
            self.config_file.write_text(self.settings.config_properties())
        except ValueError as err:  # a declaration not found, or bad serving settings
            raise ServerError(str(err)) from None
        (self.run_dir / PORTS_FILE).write_text(json.dumps(vars(self.ports)))
        try:  # before the workers, which record into its emptied folder
            self.exporter.start(console=self.settings.console_logs)
        except metrics_exporter.ExporterError as err:
            raise ServerError(str(err)) from None
        log_config = self.settings.log_config
        code, output = self._torchserve(
            "--start", "--ncs", "--ts-config", str(self.config_file),
            *(["--log-config", str(log_config)] if log_config else []),
            "--model-store", str(self.settings.model_store.resolve()), timeout=60)
        if code != 0:
            self.exporter.stop()
            raise ServerError(f"torchserve --start failed:\n{output}")
        log.info("TorchServe starting from %s (logs in %s)", self.run_dir, self.log_dir)
        if self.fronted:
            try:
                self.start_front()
            except ServerError:
                self.stop()  # no TorchServe left running behind a front that never came up
                raise

    def front_settings(self, upstream_token: str | None = None) -> front.FrontSettings:
        p, i = self.ports, self.settings.internal_ports
        return front.FrontSettings(
            nginx_dir=self.front.nginx_dir, keys_file=self.front.keys_file, listen=HOST,
            public={"http": p.inference, "oip": p.oip, "grpc": p.grpc_inference,
                    "oip-grpc": p.oip_grpc, "metrics": p.metrics},
            upstream={"http": i.inference, "oip": i.oip, "grpc": i.kiln_grpc,
                      "oip-grpc": i.oip_grpc, "metrics": i.metrics},
            max_body=self.settings.max_request_size, ready_path=READY_PATH,
            live_path=LIVE_PATH, draining_flag=self.run_dir / "draining",
            route_state=self.settings.state_file(),
            upstream_token=upstream_token, run_as=front.run_as_line(),
            kiln_metrics_socket=self.exporter.socket, admin_port=self.settings.admin_port,
            admin_socket=self.admin.socket,
            access_log=self.access_log if self.settings.access_log else None,
            spans_log=front.spans_log_path(self.run_dir) if self.settings.otlp_endpoint
            else None, trace_sample=self.settings.trace_sample)

    def start_admin(self) -> None:
        """With an admin port: Kiln's admin service, and an admin key when there is none
        (run/admin_keys, as the inference keys are made at the first start)."""
        if self.settings.admin_port is None:
            return
        keys_file = self.admin.keys_file
        if not keys_file.exists():
            front.write_keys(keys_file, [front.Key(front.new_key())])
        self.admin.start(self.settings.model_store, self.settings.models_dirs,
                         console=self.settings.console_logs)

    def start_front(self, timeout: float = 60) -> None:
        """nginx on the public ports, once TorchServe has written the token it holds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                token = self.torchserve_keys()["inference"]
                break
            except (OSError, ValueError, KeyError):  # not written yet, or half written
                pass
            if self.pid() is None:
                raise ServerError(f"TorchServe exited during start-up:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise ServerError(f"TorchServe wrote no key file within {timeout:g} s")
            time.sleep(0.05)
        settings = self.front_settings(upstream_token=token)
        try:
            with owner_only_files():
                self.start_admin()
                self.front.start(settings)
        except (front.FrontError, admin_service.AdminServiceError) as err:
            self.admin.stop()
            raise ServerError(str(err)) from None
        (self.run_dir / INTERNAL_PORTS_FILE).write_text(
            json.dumps(vars(self.settings.internal_ports)))
        if self.settings.otlp_endpoint:
            self.proxy_spans.start(console=self.settings.console_logs)

    @contextlib.contextmanager
    def running(self, timeout: float = 180):
        """Started and ready inside the block, stopped after it, whatever happens."""
        self.start()
        try:
            self.wait_ready(timeout)
            yield self
        finally:
            self.stop()

    def stop(self, timeout: float = 30) -> bool:
        """Stop the server of this run folder; False if none was running (what a dead one
        left behind is cleaned up either way).

        The drain, in order: nginx's graceful quit answers what it holds in flight; then
        TorchServe's SIGTERM (what `torchserve --stop` sends, without starting the launcher:
        0.25 s), whose graceful shutdown takes some 2.6 s here (Netty's 2 s quiet period, then
        the workers); the metrics exporter stops meanwhile, nginx being its only reader."""
        pid = self.pid()
        if pid is None:
            self.clean_up_after_crash()
            return False
        self.front.stop(timeout=min(10.0, timeout))
        self.proxy_spans.stop()  # after nginx: its last lines are sent
        self.admin.stop()  # nothing reaches it once nginx is gone; an action in it is cut
        (self.run_dir / INTERNAL_PORTS_FILE).unlink(missing_ok=True)
        try:
            frontend = psutil.Process(pid)
            frontend.terminate()
        except psutil.NoSuchProcess:
            frontend = None
        self.exporter.stop()
        if frontend is not None and processes.wait_exited([frontend], timeout):
            with contextlib.suppress(psutil.NoSuchProcess):
                frontend.kill()
            processes.wait_exited([frontend], 5)
            self.pid_file.unlink(missing_ok=True)
            self.clean_up_after_crash()  # the workers of a frontend killed outlive it
        self.pid_file.unlink(missing_ok=True)
        self.key_file.unlink(missing_ok=True)
        return True

    def terminate(self, timeout: float = 30) -> bool:
        """Stop the frontend and every worker it started, within `timeout` seconds whatever it
        takes. True when all of them exited on SIGTERM, False when some had to be killed.

        Unlike `stop` this waits for the workers too (a worker outlives a frontend killed
        hard); a process that reaps orphans (kiln-container) sees none left behind."""
        deadline = time.monotonic() + timeout
        self.front.stop(timeout=min(5.0, timeout / 3))
        pid = self.pid()
        try:
            frontend = psutil.Process(pid) if pid is not None else None
            tree = [frontend, *frontend.children(recursive=True)] if frontend else []
        except psutil.NoSuchProcess:
            tree = []
        kill_at = deadline - min(2.0, timeout / 4)  # keep a moment to kill and reap
        if tree:
            tree[0].terminate()
            psutil.wait_procs(tree[:1], timeout=max(0.0, kill_at - time.monotonic()))
        for proc in tree[1:]:  # the frontend stops its workers; these did not stop with it
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.terminate()
        _, alive = psutil.wait_procs(tree, timeout=max(0.0, kill_at - time.monotonic()))
        for proc in alive:
            log.warning("killing pid %d: still running after SIGTERM", proc.pid)
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(alive, timeout=max(0.1, deadline - time.monotonic()))
        self.exporter.stop(timeout=max(0.1, min(1.0, deadline - time.monotonic())))
        self.pid_file.unlink(missing_ok=True)
        return not alive

    # -- keys and readiness ----------------------------------------------------------------
    def torchserve_keys(self) -> dict[str, str]:
        """The management, inference and API tokens TorchServe wrote at start."""
        raw = json.loads(self.key_file.read_text())
        return {kind: raw[kind]["key"] for kind in ("management", "inference", "API")}

    def keys(self) -> dict[str, str]:
        """What a client of this server sends: TorchServe's management and API tokens, and as
        inference key the front proxy's newest (TorchServe's own when there is no front)."""
        keys = self.torchserve_keys()
        if self.fronted:
            keys["inference"] = front.current(self.front.keys()).value
        return keys

    def url(self, api: str = "inference") -> str:
        return f"http://{HOST}:{getattr(self.ports, api)}"

    def _management_token(self) -> str | None:
        """None while the key file is missing or half written."""
        try:
            return self.torchserve_keys()["management"]
        except (OSError, ValueError, KeyError):
            return None

    def model_status(self, name: str) -> list[dict]:
        return readiness.workers(self.url("management"), self.torchserve_keys()["management"],
                                 name)

    def ready(self) -> dict[str, bool]:
        """Per model: has a worker loaded it? (deploy/readiness.py)"""
        token = self._management_token()
        if token is None:
            return dict.fromkeys(self.settings.models, False)
        return readiness.models_ready(self.url("management"), token, self.settings.models)

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        last_report = 0.0
        while time.monotonic() < deadline:
            if self.pid() is None:
                raise ServerError(f"TorchServe exited during start-up:\n{self.log_tail()}")
            token = self._management_token()
            up = token is not None and readiness.api_up(self.url("management"), token)
            state = self.ready() if up else None
            if state is not None and all(state.values()):
                return
            if time.monotonic() - last_report > 10:
                waiting = [m for m in self.settings.models if not (state or {}).get(m)]
                log.info("waiting for workers: %s", ", ".join(waiting))
                last_report = time.monotonic()
            time.sleep(READY_POLL_S)
        raise ServerError(f"models not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        return logs.tail(self.log_dir / "ts_log.log", lines, "(no ts_log.log)")
