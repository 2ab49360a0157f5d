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
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import requests

from kiln.deploy import plugins
from kiln.model_store import archive_config

log = logging.getLogger("kiln.serve")

HOST = "127.0.0.1"
LOG_CONFIG = Path(__file__).resolve().parent / "log4j2.xml"
PORTS_FILE = "ports.json"  # in the run folder: how stop, predict and loadtest find a server


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

    @classmethod
    def saved(cls, run_dir: Path) -> Ports | None:
        """The ports a server started from `run_dir` wrote there, if any."""
        path = run_dir / PORTS_FILE
        return cls(**json.loads(path.read_text())) if path.exists() else None

    @classmethod
    def free(cls) -> Ports:
        """Ports the OS says are free now (for tests and side-by-side servers)."""
        sockets = []
        try:
            for _ in fields(cls):
                s = socket.socket()
                s.bind((HOST, 0))
                sockets.append(s)
            return cls(*(s.getsockname()[1] for s in sockets))
        finally:
            for s in sockets:
                s.close()


@dataclass
class ServerSettings:
    run_dir: Path
    model_store: Path
    models: list[str]
    ports: Ports = field(default_factory=Ports)
    # TorchServe's tokens expire after 60 minutes by default; a local server that outlives
    # its printed curl lines is a trap, so Kiln asks for a day. Regenerate with the API key.
    token_expiration_min: int = 1440
    max_request_size: int = 4 * 1024 * 1024
    enable_model_api: bool = False
    java_heap: str = "1g"
    access_log: bool = False
    # None: TorchServe's stock log4j2.xml (only to measure what Kiln's saves).
    log_config: Path | None = LOG_CONFIG
    # Where the served models' declarations were found besides Kiln's own (for the banner).
    models_dirs: list[Path] = field(default_factory=list)

    def config_properties(self) -> str:
        store = self.model_store.resolve()
        p = self.ports
        lines = {
            "inference_address": f"http://{HOST}:{p.inference}",
            "management_address": f"http://{HOST}:{p.management}",
            "metrics_address": f"http://{HOST}:{p.metrics}",
            "grpc_inference_address": HOST,
            "grpc_inference_port": p.grpc_inference,
            "grpc_management_address": HOST,
            "grpc_management_port": p.grpc_management,
            "model_store": store,
            "load_models": ",".join(f"{m}.mar" for m in self.models),
            # Only archives inside the local store may ever be registered.
            "allowed_urls": f"file://{store}/[^/]+\\\\.mar",
            "enable_model_api": str(self.enable_model_api).lower(),
            "token_expiration_min": self.token_expiration_min,
            "max_request_size": self.max_request_size,
            "max_response_size": self.max_request_size,
            "metrics_mode": "prometheus",
            # Kiln's handlers declare their own metrics (handlers/metrics.yaml, in each
            # archive); the frontend drops any that its metrics_config does not list, unless
            # it may register them as they first arrive.
            "model_metrics_auto_detect": "true",
            "enable_envvars_config": "false",
            "install_py_dep_per_model": "false",
            "disable_system_metrics": "false",
            "vmargs": f"-Xmx{self.java_heap} -XX:+UseContainerSupport "
                      f"-D{plugins.OIP_ADDRESS_PROPERTY}={HOST}:{p.oip}",
            # Kiln's frontend plugin serves the Open Inference Protocol on the oip port.
            "plugins_path": plugins.PLUGINS_DIR,
        }
        if not self.models:
            del lines["load_models"]  # a server for models registered later (benchmarks)
        return "".join(f"{k}={v}\n" for k, v in lines.items())


class ServerError(RuntimeError):
    pass


class Server:
    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.run_dir = settings.run_dir.resolve()
        self.ports = settings.ports

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

    def _env(self) -> dict[str, str]:
        tmp = self.run_dir / "tmp"
        env = dict(os.environ)
        # TorchServe keeps its pid file in tempfile.gettempdir(): one per run folder.
        env.update(TMPDIR=str(tmp), TEMP=str(tmp), LOG_LOCATION=str(self.log_dir),
                   METRICS_LOCATION=str(self.log_dir),
                   KILN_ACCESS_LOG="info" if self.settings.access_log else "off",
                   KILN_SERVED_WORKERS=str(self.served_workers()))
        # Workers must find the same Python (and its packages) as this process.
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        return env

    def served_workers(self) -> int:
        """Workers of all served models together, from their archives' model-config.yaml
        (handlers size their thread pools from it)."""
        total = 0
        for m in self.settings.models:
            config = archive_config(self.settings.model_store / f"{m}.mar") or {}
            try:
                total += int(config["minWorkers"])
            except (KeyError, ValueError, TypeError):
                total += 1
        return max(1, total)

    def _torchserve(self, *args: str, timeout: float) -> tuple[int, str]:
        """Run the torchserve launcher; its output goes to a file, not a pipe, because the
        Java server it spawns inherits the launcher's streams and would hold a pipe open."""
        exe = Path(sys.executable).with_name("torchserve")
        out_path = self.log_dir / "launcher.out"
        with open(out_path, "a") as out:
            code = subprocess.run([str(exe), *args], cwd=self.run_dir, env=self._env(),
                                  stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                  timeout=timeout).returncode
        return code, out_path.read_text(errors="replace")[-4000:]

    # -- lifecycle -------------------------------------------------------------------------
    def pid(self) -> int | None:
        pid_file = self.run_dir / "tmp" / ".model_server.pid"
        try:
            pid = int(pid_file.read_text().strip())
            os.kill(pid, 0)
            return pid
        except (OSError, ValueError):
            return None

    def start(self) -> None:
        if shutil.which("java") is None:
            raise ServerError("no Java runtime on PATH: install openjdk-17-jre-headless")
        if self.pid() is not None:
            raise ServerError(f"a TorchServe already runs from {self.run_dir} (kiln stop)")
        for m in self.settings.models:
            if not (self.settings.model_store / f"{m}.mar").exists():
                raise ServerError(f"no archive {m}.mar in {self.settings.model_store}: "
                                  f"run kiln archive {m}")
        try:
            plugins.ensure_built()
        except plugins.PluginError as err:
            raise ServerError(str(err)) from None
        (self.run_dir / "tmp").mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.key_file.unlink(missing_ok=True)
        self.config_file.write_text(self.settings.config_properties())
        (self.run_dir / PORTS_FILE).write_text(json.dumps(vars(self.ports)))
        log_config = self.settings.log_config
        code, output = self._torchserve(
            "--start", "--ncs", "--ts-config", str(self.config_file),
            *(["--log-config", str(log_config)] if log_config else []),
            "--model-store", str(self.settings.model_store.resolve()), timeout=60)
        if code != 0:
            raise ServerError(f"torchserve --start failed:\n{output}")
        log.info("TorchServe starting from %s (logs in %s)", self.run_dir, self.log_dir)

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
        """Stop the server of this run folder; False if none was running."""
        pid = self.pid()
        if pid is None:
            return False
        self._torchserve("--stop", timeout=timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except OSError:
                break
            time.sleep(0.2)
        else:
            os.kill(pid, 9)
        self.key_file.unlink(missing_ok=True)
        return True

    # -- keys and readiness ----------------------------------------------------------------
    def keys(self) -> dict[str, str]:
        """The management, inference and API tokens TorchServe wrote at start."""
        raw = json.loads(self.key_file.read_text())
        return {kind: raw[kind]["key"] for kind in ("management", "inference", "API")}

    def url(self, api: str = "inference") -> str:
        return f"http://{HOST}:{getattr(self.ports, api)}"

    def _api_up(self) -> bool:
        """The key file is complete and the management API answers with its token."""
        try:
            r = requests.get(f"{self.url('management')}/models", timeout=5,
                             headers={"Authorization": f"Bearer {self.keys()['management']}"})
        except (OSError, ValueError, KeyError):  # no or half-written key file, no socket yet
            return False
        return r.status_code == 200

    def model_status(self, name: str) -> list[dict]:
        r = requests.get(f"{self.url('management')}/models/{name}", timeout=5,
                         headers={"Authorization": f"Bearer {self.keys()['management']}"})
        r.raise_for_status()
        return r.json()[0].get("workers", [])

    def ready(self) -> dict[str, bool]:
        """Per model: has a worker loaded it? (/ping says Healthy well before that.)"""
        out = {}
        for name in self.settings.models:
            try:
                workers = self.model_status(name)
            except (requests.RequestException, OSError, ValueError, KeyError):
                out[name] = False
                continue
            out[name] = any(w.get("status") == "READY" for w in workers)
        return out

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        last_report = 0.0
        while time.monotonic() < deadline:
            if self.pid() is None:
                raise ServerError(f"TorchServe exited during start-up:\n{self.log_tail()}")
            state = self.ready() if self._api_up() else None
            if state is not None and all(state.values()):
                return
            if time.monotonic() - last_report > 10:
                waiting = [m for m in self.settings.models if not (state or {}).get(m)]
                log.info("waiting for workers: %s", ", ".join(waiting))
                last_report = time.monotonic()
            time.sleep(0.5)
        raise ServerError(f"models not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        path = self.log_dir / "ts_log.log"
        if not path.exists():
            return "(no ts_log.log)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
