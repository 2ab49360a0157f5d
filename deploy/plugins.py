"""The TorchServe frontend plugin that serves the Open Inference Protocol (deploy/oip_plugin).

TorchServe 0.12 answers /v2/models/NAME and /v2/models/NAME/ready with 404, and its /v2 ready
routes say yes before any worker has loaded a model. The plugin serves all of /v2 on its own
port, inside TorchServe's JVM, from the frontend's own model and worker state (a plugin
endpoint on the inference port cannot read a POST body reliably: pytorch/serve#2595). It is
Java source in the repository and a jar built here (git-ignored), so a clean clone needs javac
(openjdk-17-jdk-headless) to serve.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path

from kiln.handlers import limits

log = logging.getLogger("kiln.plugins")

OIP_PLUGIN_SOURCE = Path(__file__).resolve().parent / "oip_plugin"
# TorchServe puts every jar in plugins_path on the frontend's classpath.
PLUGINS_DIR = OIP_PLUGIN_SOURCE / "build"
OIP_PLUGIN_JAR = PLUGINS_DIR / "kiln-oip.jar"
# The JVM system property (set in vmargs) with the host:port the plugin serves OIP on.
OIP_ADDRESS_PROPERTY = "kiln.oip.address"


def limit_properties() -> dict[str, int]:
    """The handler's bounds on one request, as JVM properties for the plugin, which checks a
    binary request against them before its body goes anywhere (RequestLimits.java)."""
    return {"kiln.oip.max_instances": limits.MAX_INSTANCES,
            "kiln.oip.max_request_values": limits.MAX_REQUEST_VALUES}


class PluginError(RuntimeError):
    pass


def plugin_sources(source: Path = OIP_PLUGIN_SOURCE) -> list[Path]:
    """Every file the jar is built from (also what decides whether it is stale)."""
    return sorted(p for p in source.rglob("*")
                  if p.is_file() and source / "build" not in p.parents)


def is_stale(jar: Path = OIP_PLUGIN_JAR, source: Path = OIP_PLUGIN_SOURCE) -> bool:
    if not jar.exists():
        return True
    built = jar.stat().st_mtime
    return any(p.stat().st_mtime > built for p in plugin_sources(source))


def ensure_built(jar: Path = OIP_PLUGIN_JAR, source: Path = OIP_PLUGIN_SOURCE) -> Path:
    """Builds the OIP plugin jar when it is missing or older than its sources."""
    if not is_stale(jar, source):
        return jar
    if shutil.which("javac") is None:
        raise PluginError("no javac on PATH to build the OIP plugin: "
                          "install openjdk-17-jdk-headless")
    log.info("building the OIP plugin from %s", source)
    done = subprocess.run(["bash", str(source / "build.sh"), sys.executable],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise PluginError(f"building the OIP plugin failed:\n{done.stdout}{done.stderr}")
    return jar
