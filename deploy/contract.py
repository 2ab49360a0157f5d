"""One port, path and name per concept for Kiln in a container: the Dockerfile, compose,
Kubernetes and KServe manifests, the entrypoint and the front proxy all take theirs from here
(a test checks that the files agree). docs/deploy.md says why each is what it is.

In a container, TorchServe listens on loopback only, with its own token auth off; a front
proxy (nginx) owns every public port, checks each client's key against a mounted secret, and
never forwards the management API.
"""

from __future__ import annotations

from kiln.deploy.server import Ports

# What clients and the cluster reach (the front proxy's listeners, on every interface).
PUBLIC_PORTS = {
    "http": 8080,      # REST inference (/predictions/NAME) and the probes below
    "oip": 8085,       # Open Inference Protocol (KServe v2 REST)
    "grpc": 7070,      # TorchServe's gRPC inference API (with versions: Kiln's plugin serves it)
    "oip-grpc": 8086,  # Open Inference Protocol over gRPC (KServe's grpc-v2)
    "metrics": 8082,   # Prometheus scrape target, no key (keep it off the public Service)
}
# TorchServe behind it, on 127.0.0.1 inside the container: never reachable from outside.
INTERNAL_PORTS = Ports(inference=18080, management=18081, metrics=18082, grpc_inference=17070,
                       grpc_management=17071, oip=18085, kiln_grpc=17072, oip_grpc=18086)

# Probes, on the http port, answered by the front proxy without a key.
READY_PATH = "/ready"      # 200 once every model has a loaded worker and TorchServe's
                           # inference port accepts; 503 while draining
LIVE_PATH = "/live"        # 200 while the proxy and TorchServe's frontend answer (busy is alive)

# Where things are inside the image.
HOME = "/home/kiln"
MODEL_STORE = "/models"                   # baked in at build time, or a mounted volume
KEYS_FILE = "/var/run/secrets/kiln/keys"  # one key per line; a mounted Secret
RUN_DIR = "/var/run/kiln"                 # writable (an emptyDir): config, pid, tmp, extracts
# The versions served, their routes and shadows (deploy/versions.py's versions.json), if any:
# a ConfigMap mounted as a folder (a subPath mount would never see an update).
VERSIONS_FILE = "/etc/kiln/versions/versions.json"
USER_ID = 10001                           # the non-root user the image runs as

# The entrypoint's settings, as environment variables (flags of `kiln-container` win).
ENV = {
    "models": "KILN_MODELS",              # comma-separated names; default: every .mar in store
    "model_store": "KILN_MODEL_STORE",
    "keys_file": "KILN_KEYS_FILE",
    "run_dir": "KILN_RUN_DIR",
    "grace_s": "KILN_GRACE_SECONDS",      # SIGTERM to exit, at most (default 30)
    "drain_delay_s": "KILN_DRAIN_DELAY_SECONDS",  # readiness false before listeners close (5)
    "java_heap": "KILN_JAVA_HEAP",        # e.g. 1g
    "versions_file": "KILN_VERSIONS_FILE",  # versions.json (default VERSIONS_FILE), if present
    "payload_log": "KILN_PAYLOAD_LOG",    # fraction of requests in the payload log (0: off)
}
