"""The TorchServe frontend plugin that serves the Open Inference Protocol (deploy/oip_plugin),
and TorchServe's gRPC inference API with Kiln's versions (its GrpcServer.java).

TorchServe 0.12 answers /v2/models/NAME and /v2/models/NAME/ready with 404, and its /v2 ready
routes say yes before any worker has loaded a model. The plugin serves all of /v2 on its own
port, inside TorchServe's JVM, from the frontend's own model and worker state (a plugin
endpoint on the inference port cannot read a POST body reliably: pytorch/serve#2595).

Kiln ships the plugin's Java sources (package data) and builds the jar at the first serve,
into a per-user cache keyed by the sources' digest and TorchServe's version, not into the
wheel: javac compiles against the model-server.jar of the TorchServe installed beside Kiln,
which a wheel build has neither (no JDK nor torchserve in its isolated environment) nor can
know; the wheel stays pure Python; and site-packages is never written to. The cost is javac
(openjdk-17-jdk-headless, which `make serve` installs) at that first serve: 3.1-4.2 s here.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from kiln.handlers import limits

log = logging.getLogger("kiln.plugins")

OIP_PLUGIN_SOURCE = Path(__file__).resolve().parent / "oip_plugin"
JAR_NAME = "kiln-oip.jar"
# The JVM system property (set in vmargs) with the host:port the plugin serves OIP on.
OIP_ADDRESS_PROPERTY = "kiln.oip.address"
# The same for Kiln's gRPC inference server in the plugin (GrpcServer.java).
GRPC_ADDRESS_PROPERTY = "kiln.grpc.address"
# The same for the Open Inference Protocol over gRPC (GrpcOip.java).
OIP_GRPC_ADDRESS_PROPERTY = "kiln.oip_grpc.address"


def limit_properties() -> dict[str, int]:
    """The handler's bounds on one request, as JVM properties for the plugin, which checks a
    binary request against them before its body goes anywhere (RequestLimits.java)."""
    return {"kiln.oip.max_instances": limits.MAX_INSTANCES,
            "kiln.oip.max_request_values": limits.MAX_REQUEST_VALUES}


def greedy_batching_vmargs() -> str:
    """The JVM arguments that run the plugin jar's greedy-batching agent (GreedyBatching.java):
    a batch takes what is queued and never waits the batch delay on an empty queue, so a lone
    request does not pay for batching and a job is never held outside a request when its
    worker dies. The export lets the agent use the JDK's own ASM to rewrite that wait."""
    return (f"-javaagent:{plugins_dir() / JAR_NAME} "
            "--add-exports java.base/jdk.internal.org.objectweb.asm=ALL-UNNAMED")


class PluginError(RuntimeError):
    pass


def default_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kiln" / "oip-plugin"


def plugin_sources(source: Path = OIP_PLUGIN_SOURCE) -> list[Path]:
    """Every file the jar is built from (also what its cache key is made of)."""
    return sorted(p for p in source.rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts)


def plugins_dir(source: Path = OIP_PLUGIN_SOURCE, cache_root: Path | None = None) -> Path:
    """TorchServe's plugins_path: a folder holding this build's jar alone (TorchServe puts
    every jar there on the frontend's classpath), named by what the jar is built from, so an
    edited source or another TorchServe gets its own jar and two Kilns never share a stale one."""
    digest = hashlib.sha256()
    for path in plugin_sources(source):
        digest.update(path.relative_to(source).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    key = f"torchserve-{metadata.version('torchserve')}-{digest.hexdigest()[:16]}"
    return (cache_root or default_cache_root()) / key


def ensure_built(source: Path = OIP_PLUGIN_SOURCE, cache_root: Path | None = None) -> Path:
    """Builds the OIP plugin jar unless the cache has it; returns its plugins folder."""
    target = plugins_dir(source, cache_root)
    if (target / JAR_NAME).exists():
        return target
    if shutil.which("javac") is None:
        raise PluginError("no javac on PATH to build the OIP plugin: "
                          "install openjdk-17-jdk-headless")
    log.info("building the OIP plugin from %s into %s", source, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built beside the target and renamed into place: a concurrent first serve never puts a
    # half-written jar on a frontend's classpath.
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".partial-") as tmp:
        done = subprocess.run(["bash", str(source / "build.sh"), tmp, sys.executable],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise PluginError(f"building the OIP plugin failed:\n{done.stdout}{done.stderr}")
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the jar from other users (an image's)
        try:
            Path(tmp).rename(target)
        except OSError:
            if not (target / JAR_NAME).exists():  # not a lost race: something is in the way
                raise
        # The renamed folder is gone from under TemporaryDirectory, which then removes nothing.
    return target
