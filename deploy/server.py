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
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import psutil
import requests

from kiln import declaration
from kiln.deploy import front, logs, metrics_exporter, plugins, processes
from kiln.handlers.cores import usable_cores
from kiln.keys import KEYS_FILE, private_dir
from kiln.model_store import read_archive

log = logging.getLogger("kiln.serve")

HOST = "127.0.0.1"
LOG_CONFIG = Path(__file__).resolve().parent / "log4j2.xml"
# The same loggers written to stdout, for a container (read-only root, logs collected).
CONSOLE_LOG_CONFIG = LOG_CONFIG.with_name("log4j2-console.xml")
# On the PYTHONPATH of TorchServe's processes: defers torch in its workers.
WORKER_SITE = LOG_CONFIG.with_name("worker_site")
PORTS_FILE = "ports.json"  # in the run folder: how stop, predict and loadtest find a server
INTERNAL_PORTS_FILE = "internal_ports.json"  # TorchServe's own, behind the front proxy
# TorchServe's own inference token behind the front proxy is a service credential that only
# the proxy holds: it must not expire under it (TorchServe counts in minutes: ten years).
FRONTED_TOKEN_MIN = 10 * 365 * 24 * 60
# The frontend JVM's heap at start: about twice what it holds live (some 60 MB after a full
# collection, under the binary OIP flood of loadtests/oip_flood.py too).
JAVA_HEAP_START = 128 * 1024 * 1024
JAVA_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
# Probes the front proxy answers on the inference port without a key.
READY_PATH = "/ready"
LIVE_PATH = "/live"
# How often wait_ready asks: a poll is a few local requests (about 1 ms each) to the
# management API, and half a second of polling was up to half a second of `kiln serve`.
READY_POLL_S = 0.05


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


class ServerError(RuntimeError):
    pass


# What an archive built before Kiln moved workers and batching to config.properties may still
# carry: TorchServe lets these win over kiln serve's settings.
SHADOWING_KEYS = ("minWorkers", "maxWorkers", "batchSize", "maxBatchDelay")


# The requests a model's workers batch together, shared among them, and the least one
# worker batches. Measured with kiln tune lenet on 2 cores (wrk, 16 clients, 1 ms delay):
# one worker reached 3140 req/s with batch 16 and 2284 with 8; two workers 3189 with 8 and
# 2912 with 16 (the clients spread over the workers, so each worker's batch is smaller).
# A batch waits for no one beyond the delay, so a bigger limit costs nothing when idle.
BATCH_PER_MODEL = 16
MIN_BATCH = 8
# TorchServe holds a lone client's request for the whole delay, waiting for a second one:
# 1-client p50 = unbatched p50 + delay. Keeping it within 1.5x the unbatched p50 caps the
# delay at half of that. lenet's unbatched 1-client p50 on 2 cores, wrk straight to
# TorchServe (kiln tune lenet, two runs): 1.5 to 1.7 ms, so 0.8 ms; 1 ms is the least a
# batch can have (TorchServe reads 0 as its own 100 ms) and measured 1.4x to 1.6x, where 2 ms
# measured 2.1x to 2.3x. Behind the front proxy the unbatched p50 is higher, the ratio lower.
MAX_BATCH_DELAY_MS = 1


@dataclass(frozen=True)
class ModelServing:
    """A served model's workers and batching: what a declaration's [serving] or a flag set,
    over `derived`'s defaults for the machine and the models served beside it.

    They go into config.properties' `models` setting, never into the archive: TorchServe
    lets an archive's model-config.yaml win over config.properties for these keys. The
    field names are a declaration's [serving] keys.
    """

    workers: int = 1
    batch_size: int = BATCH_PER_MODEL
    max_batch_delay_ms: int = MAX_BATCH_DELAY_MS

    def __post_init__(self):
        for f in fields(self):
            value, least = getattr(self, f.name), 0 if f.name == "max_batch_delay_ms" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{f.name} must be a whole number >= {least}, got {value!r}")
        if self.max_batch_delay_ms == 0 and self.batch_size > 1:
            # config.properties cannot say 0: TorchServe reads a value <= 0 there as unset.
            raise ValueError("max_batch_delay_ms 0 with batch_size > 1 would be read by "
                             "TorchServe as its own default (100 ms): use 1 or more")

    @classmethod
    def derived(cls, cores: int, models: int) -> ModelServing:
        """Defaults that need no tuning, for `models` served together on `cores` usable cores
        (kiln.handlers.cores: affinity and cgroup quota, not the host's count).

        - workers: cores // models, at least 1. A worker is one process running one batch at
          a time on about one core; all workers together about as many as the cores keeps
          every core busy when traffic is spread and none oversubscribed when it all comes at
          once, and memory (one process per worker) grows with the cores, not past them.
        - intra-op threads (the handler's "auto", from KILN_SERVED_WORKERS): cores // all
          workers, at least 1, so that workers running at once never fight for cores.
        - batch size BATCH_PER_MODEL // workers, at least MIN_BATCH (16 for one worker, 8
          for more): a model's clients spread over its workers, so each worker's batch fills
          less as they grow; a lone request never waits for a batch to fill, only for the
          delay, so a batch limit costs nothing when idle.
        - max batch delay MAX_BATCH_DELAY_MS: TorchServe holds a lone client's request for the
          whole delay, so it is capped to keep one client's p50 within 1.5x the unbatched
          p50 (see the constant for the measurement).
        """
        if cores < 1 or models < 1:
            raise ValueError(f"cores and models must be >= 1, got {cores} and {models}")
        workers = max(1, cores // models)
        return cls(workers=workers, batch_size=max(MIN_BATCH, BATCH_PER_MODEL // workers),
                   max_batch_delay_ms=MAX_BATCH_DELAY_MS)

    @classmethod
    def resolve(cls, declared: Mapping[str, int], defaults: ModelServing | None = None,
                **given: int | None) -> ModelServing:
        """`defaults` (None: the class's), then `declared` (a declaration's [serving]), then
        what was given (None: not given). Keys of `declared` that are not serve-time
        settings are ignored."""
        names = {f.name for f in fields(cls)}
        chosen = vars(defaults).copy() if defaults is not None else {}
        chosen.update({k: v for k, v in declared.items() if k in names})
        chosen.update({k: v for k, v in given.items() if v is not None})
        return cls(**chosen)

    def torchserve(self) -> dict[str, int]:
        """The settings as TorchServe names them in config.properties' `models`."""
        return {"minWorkers": self.workers, "maxWorkers": self.workers,
                "batchSize": self.batch_size, "maxBatchDelay": self.max_batch_delay_ms}


def declared_serving(name: str, models_dirs: list[Path] | None = None,
                     defaults: ModelServing | None = None, **given: int | None) -> ModelServing:
    """What `name` is served with: `defaults` (ModelServing.derived's, for the machine and
    the models served) < its declaration's [serving] < `given`."""
    return ModelServing.resolve(declaration.get(name, models_dirs).serving, defaults, **given)


def archive_version(mar: Path) -> str:
    """The version in an archive's manifest: TorchServe keys `models` by name and version."""
    manifest, _ = read_archive(mar)
    try:
        return str(manifest["model"]["modelVersion"])
    except (TypeError, KeyError):
        raise ServerError(f"{mar} is missing or has no readable manifest: run kiln archive "
                          f"{mar.stem}") from None


def java_bytes(size: str) -> int:
    """A JVM memory size ("1g", "512m", "1048576") in bytes."""
    number, unit = size[:-1], size[-1].lower()
    if unit.isdigit():
        number, unit = size, ""
    if not number.isdigit() or unit not in JAVA_SIZE_UNITS:
        raise ValueError(f"not a JVM memory size: {size!r} (say 1g or 512m)")
    return int(number) * JAVA_SIZE_UNITS[unit]


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
    # Requests a model holds waiting, beyond the batches its workers hold: past it TorchServe
    # answers 503 at once (the front proxy adds Retry-After) instead of queueing a flood.
    # TorchServe's default is 100; the largest legal request (handlers/limits.py, 4096x4096
    # pixels) takes about 0.5 s on 2 cores and a batch holds two of them at most, so 64 keeps
    # the last one's wait near 30 s while 64 clients of small requests queue without a 503.
    job_queue_size: int = 64
    # TorchServe replaces a worker that spends longer than this on one batch (its default:
    # 120 s). The worst legal batch takes about 1 s here (two requests at the pixel bound,
    # loadtests/reliability.py), so 30 s leaves a slower machine 30 times that.
    response_timeout_s: int = 30
    enable_model_api: bool = False
    java_heap: str = "1g"
    access_log: bool = False
    # None: TorchServe's stock log4j2.xml (only to measure what Kiln's saves).
    log_config: Path | None = LOG_CONFIG
    # Where the served models' declarations were found besides Kiln's own (for the banner,
    # and for the serving settings of a model that `serving` does not list).
    models_dirs: list[Path] = field(default_factory=list)
    # Per served model, what it is served with; a model not listed gets its declaration's.
    serving: dict[str, ModelServing] = field(default_factory=dict)
    # False only behind a front proxy that checks keys itself (kiln-container): TorchServe's
    # own tokens are random at every start and cannot be supplied.
    token_auth: bool = True
    # Where TorchServe itself listens for inference, OIP, gRPC inference and metrics when
    # Kiln's front proxy (deploy/front.py) owns those of `ports` and checks the keys (kiln
    # serve); None: TorchServe listens on `ports` and checks its own tokens. Management stays
    # TorchServe's own, on `ports`, with its management token.
    internal_ports: Ports | None = None
    # The launcher's and TorchServe's output to this process's stdout, not to the run folder.
    console_logs: bool = False
    # Usable cores (affinity, cgroup quota) that the serving defaults are derived from.
    cores: int = field(default_factory=usable_cores)

    def serving_defaults(self) -> ModelServing:
        """ModelServing.derived for these cores and these models."""
        return ModelServing.derived(self.cores, max(1, len(self.models)))

    def model_serving(self, name: str) -> ModelServing | None:
        """What `name` is served with (None: TorchServe's own defaults)."""
        if name in self.serving:
            return self.serving[name]
        return declared_serving(name, self.models_dirs, self.serving_defaults())

    def models_setting(self) -> dict:
        """config.properties' `models`: per model and archive version, its settings."""
        out = {}
        for name in self.models:
            settings = self.model_serving(name)
            if settings is None:
                continue
            mar = f"{name}.mar"
            out[name] = {archive_version(self.model_store / mar): {
                "defaultVersion": True, "marName": mar, **settings.torchserve()}}
        return out

    def served_workers(self) -> int:
        """Workers of all served models together (handlers size their thread pools by it)."""
        return max(1, sum(s.workers if s else 1 for s in map(self.model_serving, self.models)))

    def torchserve_ports(self) -> Ports:
        """The ports TorchServe binds."""
        if self.internal_ports is None:
            return self.ports
        i = self.internal_ports
        return replace(self.ports, inference=i.inference, oip=i.oip,
                       grpc_inference=i.grpc_inference, metrics=i.metrics)

    def __post_init__(self):
        java_bytes(self.java_heap)  # a bad -Xmx fails here, not when the JVM starts

    def config_properties(self) -> str:
        store = self.model_store.resolve()
        p = self.torchserve_ports()
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
            # Workers and batching per model (the archives carry none), for the archives
            # that load_models names; one line, as Java properties want it.
            "models": json.dumps(self.models_setting(), separators=(",", ":")),
            # Only archives inside the local store may ever be registered.
            "allowed_urls": f"file://{store}/[^/]+\\\\.mar",
            "enable_model_api": str(self.enable_model_api).lower(),
            "token_expiration_min": (self.token_expiration_min if self.internal_ports is None
                                     else FRONTED_TOKEN_MIN),
            "max_request_size": self.max_request_size,
            "job_queue_size": self.job_queue_size,
            "default_response_timeout": self.response_timeout_s,
            "max_response_size": self.max_request_size,
            "metrics_mode": "prometheus",
            # Kiln's handlers record theirs with prometheus-client, past the frontend
            # (deploy/metrics_exporter.py); a user's handler may still use TorchServe's API.
            "model_metrics_auto_detect": "true",
            "enable_envvars_config": "false",
            "install_py_dep_per_model": "false",
            "disable_system_metrics": "false",
            # java.io.tmpdir is where TorchServe extracts archives: the run folder's tmp, as
            # TMPDIR is for the Python side (writable under a read-only root filesystem).
            # The frontend's heap starts at a fixed size, not the JVM's 1/64 of the host's
            # memory (all of -Xmx on a 64 GB host), and with the serial collector, which the
            # JVM picks itself on a small host: the frontend routes bytes and keeps little.
            # Under 8 clients x 20 s of the binary OIP flood, G1 grew or touched the heap it
            # committed (RSS +104 to +192 MB in 5 runs, young pauses 19 ms median, 47 MB of
            # its own tables); the serial collector held 128-149 MB (RSS +85 to +105 MB in
            # 3 runs, young pauses 3.5 ms median, 79 ms at most).
            "vmargs": f"-Xms{min(JAVA_HEAP_START, java_bytes(self.java_heap))} "
                      f"-Xmx{self.java_heap} -XX:+UseSerialGC "
                      "-XX:+UseContainerSupport "
                      f"-Djava.io.tmpdir={self.run_dir.resolve() / 'tmp'} "
                      f"-D{plugins.OIP_ADDRESS_PROPERTY}={HOST}:{p.oip} "
                      + " ".join(f"-D{k}={v}" for k, v in plugins.limit_properties().items()),
            # Kiln's frontend plugin serves the Open Inference Protocol on the oip port.
            "plugins_path": plugins.plugins_dir(),
        }
        if not self.token_auth:
            lines["disable_token_authorization"] = "true"
        if not self.models:
            del lines["load_models"]  # a server for models registered later (benchmarks)
        if lines["models"] == "{}":
            del lines["models"]
        return "".join(f"{k}={v}\n" for k, v in lines.items())


@contextlib.contextmanager
def owner_only_files():
    """umask 077 inside the block: what this process and the processes it starts create is
    readable by its owner only."""
    mask = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(mask)


def owner_only(folder: Path) -> None:
    """`folder` and everything in it readable by its owner only (what an earlier run, or an
    earlier Kiln, left readable by others included)."""
    private_dir(folder)
    for root, dirs, files in os.walk(folder):
        for name in (*dirs, *files):
            path = Path(root, name)
            with contextlib.suppress(OSError):
                mode = path.lstat().st_mode
                if mode & 0o077 and not path.is_symlink():
                    path.chmod(mode & 0o700)


class Server:
    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.run_dir = settings.run_dir.resolve()
        self.ports = settings.ports
        self.front = front.Front(self.run_dir / "nginx", self.run_dir / KEYS_FILE)
        self.exporter = metrics_exporter.Exporter(self.run_dir)  # the handlers' metrics

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
    def fronted(self) -> bool:
        return self.settings.internal_ports is not None

    def _env(self) -> dict[str, str]:
        tmp = self.run_dir / "tmp"
        env = dict(os.environ)
        # TorchServe keeps its pid file in tempfile.gettempdir(): one per run folder.
        env.update(TMPDIR=str(tmp), TEMP=str(tmp), LOG_LOCATION=str(self.log_dir),
                   METRICS_LOCATION=str(self.log_dir),
                   KILN_ACCESS_LOG="info" if self.settings.access_log else "off",
                   KILN_SERVED_WORKERS=str(self.served_workers()),
                   PROMETHEUS_MULTIPROC_DIR=str(self.exporter.folder))
        # Workers must find the same Python (and its packages) as this process.
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        # Workers import torch on first use only (an ONNX worker never does: faster to ready,
        # lighter); see worker_site/sitecustomize.py.
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(WORKER_SITE), env.get("PYTHONPATH")) if p)
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
        try:
            pid = int(self.pid_file.read_text().strip())
            return pid if FRONTEND_CLASS in psutil.Process(pid).cmdline() else None
        except (OSError, ValueError, psutil.Error):
            return None

    def orphan_workers(self) -> list[psutil.Process]:
        """Workers of this run folder whose frontend is gone (a killed frontend leaves its
        workers running: they hold memory and the model). Found by the socket path that
        each worker is started with, which lives in this run folder."""
        sockets = str(self.run_dir / "tmp") + os.sep
        frontend = self.pid()
        orphans = []
        for proc in psutil.process_iter(["cmdline", "ppid"]):
            cmdline = proc.info["cmdline"] or []
            if not any(a.endswith("model_service_worker.py") for a in cmdline):
                continue
            if any(a.startswith(sockets) for a in cmdline) and proc.info["ppid"] != frontend:
                orphans.append(proc)
        return orphans

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
        (self.run_dir / INTERNAL_PORTS_FILE).unlink(missing_ok=True)
        if self.pid_file.exists():
            self.pid_file.unlink(missing_ok=True)
            done.append(f"removed the pid file of a TorchServe that is gone ({self.pid_file})")
            if self.key_file.exists():
                self.key_file.unlink(missing_ok=True)
                done.append(f"removed its key file ({self.key_file}): its tokens died with it")
        orphans = self.orphan_workers()
        for proc in orphans:
            with contextlib.suppress(psutil.Error):
                proc.terminate()
        _, alive = psutil.wait_procs(orphans, timeout=10)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        if orphans:
            done.append(f"stopped {len(orphans)} orphan worker(s) of it: pids "
                        f"{', '.join(str(p.pid) for p in orphans)}")
        for line in done:
            log.warning("%s: %s", self.run_dir, line)
        return done

    def start(self) -> None:
        """TorchServe, its metrics exporter and, when fronted, the front proxy, each writing
        only owner-only files into a run folder that only its owner may enter: keys, tokens
        and what derives from them (nginx's configuration and keys map, TorchServe's key
        file, logs that may quote a request) are nobody else's (umask 077 for them all)."""
        with owner_only_files():
            self._start()

    def _start(self) -> None:
        if shutil.which("java") is None:
            raise ServerError("no Java runtime on PATH: install openjdk-17-jre-headless")
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
                    "metrics": p.metrics},
            upstream={"http": i.inference, "oip": i.oip, "grpc": i.grpc_inference,
                      "metrics": i.metrics},
            max_body=self.settings.max_request_size, ready_path=READY_PATH,
            live_path=LIVE_PATH, draining_flag=self.run_dir / "draining",
            upstream_token=upstream_token, run_as=front.run_as_line(),
            kiln_metrics_socket=self.exporter.socket)

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
                self.front.start(settings)
        except front.FrontError as err:
            raise ServerError(str(err)) from None
        (self.run_dir / INTERNAL_PORTS_FILE).write_text(
            json.dumps(vars(self.settings.internal_ports)))

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

    def _api_up(self) -> bool:
        """The key file is complete and the management API answers with its token."""
        try:
            r = requests.get(f"{self.url('management')}/models", timeout=5, headers={
                "Authorization": f"Bearer {self.torchserve_keys()['management']}"})
        except (OSError, ValueError, KeyError):  # no or half-written key file, no socket yet
            return False
        return r.status_code == 200

    def model_status(self, name: str) -> list[dict]:
        r = requests.get(f"{self.url('management')}/models/{name}", timeout=5, headers={
            "Authorization": f"Bearer {self.torchserve_keys()['management']}"})
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
            time.sleep(READY_POLL_S)
        raise ServerError(f"models not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        return logs.tail(self.log_dir / "ts_log.log", lines, "(no ts_log.log)")
