"""What a TorchServe is started with: its settings, and the config.properties they render."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from kiln.deploy import plugins, routing
from kiln.deploy.ports import HOST, Ports
from kiln.deploy.serving import ModelServing, declared_serving
from kiln.handlers import payload_log as payloads
from kiln.handlers.cores import usable_cores
from kiln.handlers.watch import DEFAULT_DELAY_MS as DEFAULT_WATCH_DELAY_MS
from kiln.handlers.watch import DEFAULT_DRIFT_ROWS_PER_S
from kiln.model_store import read_archive

LOG_CONFIG = Path(__file__).resolve().parent / "log4j2.xml"
# The same loggers written to stdout, for a container (read-only root, logs collected).
CONSOLE_LOG_CONFIG = LOG_CONFIG.with_name("log4j2-console.xml")
# TorchServe's own inference token behind the front proxy is a service credential that only
# the proxy holds: it must not expire under it (TorchServe counts in minutes: ten years).
FRONTED_TOKEN_MIN = 10 * 365 * 24 * 60
# The frontend JVM's heap at start: about twice what it holds live (some 60 MB after a full
# collection, under the binary OIP flood of loadtests/studies/oip_flood.py too).
JAVA_HEAP_START = 128 * 1024 * 1024
JAVA_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


class ServerError(RuntimeError):
    pass


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
    # loadtests/studies/reliability/), so 30 s leaves a slower machine 30 times that.
    response_timeout_s: int = 30
    enable_model_api: bool = False
    # The front proxy's admin port (deploy/admin_service.py), on the same address as the
    # others; None: no admin route (the default).
    admin_port: int | None = None
    # The versions served and their routes: the run folder's versions.json unless another
    # file is named (a container's mounted one, deploy/container.py).
    versions_file: Path | None = None
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
    # Where the proxy's and the handler's spans go (OTLP/HTTP, its base URL; kiln.handlers.
    # tracing); None: no spans. nginx then writes the sampled traces' access log lines to a
    # spans log (front.spans_log_path), which the proxy's spans come from.
    otlp_endpoint: str | None = None
    trace_sample: float = 1.0  # the share of fresh traces (no caller's traceparent) sampled
    # Usable cores (affinity, cgroup quota) that the serving defaults are derived from.
    cores: int = field(default_factory=usable_cores)
    # The sampled payload log (handlers/payload_log.py): the fraction of requests whose body
    # and answer the workers write to payload_dir(); 0 is off. Its bounds: bytes a file,
    # files kept.
    payload_log: float = 0.0
    payload_log_max_bytes: int = payloads.DEFAULT_MAX_BYTES
    payload_log_files: int = payloads.DEFAULT_FILES
    # The handler's answer and drift metrics (handlers/watch.py); False only to measure what
    # they cost (kiln bench's observability rows).
    watch: bool = True
    # How long a worker may hold answers before it records them (handlers/watch.py); 0: each
    # batch as it is answered (loadtests/studies/drift.py reads a score after every answer).
    watch_delay_ms: int = DEFAULT_WATCH_DELAY_MS
    # The most rows a second each worker computes drift statistics on (handlers/watch.py);
    # 0: every row (loadtests/studies/drift.py counts the requests until an alert).
    drift_rows_per_s: int = DEFAULT_DRIFT_ROWS_PER_S
    # False: TorchServe's own batching, which holds a lone request for the whole batch delay
    # (only to measure what greedy batching saves: loadtests/studies/edges.py).
    greedy_batching: bool = True
    # False: workers without deploy/worker_site (torch imported at start, TorchServe's own
    # frame reading); only to measure what it saves (kiln bench's plain row runs TorchServe
    # as released).
    worker_site: bool = True

    def state_file(self) -> Path:
        """versions.json's absolute path: nginx and the JVM run from other folders."""
        if self.versions_file is not None:
            return self.versions_file.resolve()
        return routing.state_file(self.run_dir)

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
                       grpc_inference=i.grpc_inference, metrics=i.metrics,
                       kiln_grpc=i.kiln_grpc, oip_grpc=i.oip_grpc)

    def __post_init__(self):
        java_bytes(self.java_heap)  # a bad -Xmx fails here, not when the JVM starts
        payloads.check_bounds(self.payload_log, self.payload_log_max_bytes,
                                 self.payload_log_files)

    def payload_dir(self) -> Path:
        """Where the payload log goes: the run folder's payloads/."""
        return self.run_dir.resolve() / payloads.FOLDER

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
                      f"-D{plugins.GRPC_ADDRESS_PROPERTY}={HOST}:{p.kiln_grpc} "
                      f"-D{plugins.OIP_GRPC_ADDRESS_PROPERTY}={HOST}:{p.oip_grpc} "
                      f"-D{routing.STATE_PROPERTY}={self.state_file()} "
                      + " ".join(f"-D{k}={v}" for k, v in plugins.limit_properties().items())
                      + (f" {plugins.greedy_batching_vmargs()}" if self.greedy_batching else ""),
            # Kiln's frontend plugin serves the Open Inference Protocol on the oip port, and
            # gRPC inference with versions on the kiln_grpc port, OIP over gRPC on oip_grpc.
            "plugins_path": plugins.plugins_dir(),
        }
        if not self.token_auth:
            lines["disable_token_authorization"] = "true"
        if not self.models:
            del lines["load_models"]  # a server for models registered later (benchmarks)
        if lines["models"] == "{}":
            del lines["models"]
        return "".join(f"{k}={v}\n" for k, v in lines.items())
