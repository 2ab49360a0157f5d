#!/usr/bin/env bash
# Install what is missing, and nothing else: a Java runtime for TorchServe, the virtual
# environment, and the project with its CPU and test extras. Safe to run again: it only
# reinstalls Python packages when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
EXTRAS="${KILN_EXTRAS:-cpu,test,parquet,ray}"

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# TorchServe needs a Java runtime; javac builds Kiln's TorchServe plugin (deploy/oip_plugin).
# The JDK brings both.
if ! command -v java >/dev/null 2>&1 || ! command -v javac >/dev/null 2>&1; then
    echo "bootstrap: installing openjdk-17-jdk-headless (java and javac)" >&2
    as_root apt-get update
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y openjdk-17-jdk-headless
fi

# The metrics tests scrape TorchServe with a real Prometheus and lint with promtool.
if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
    echo "bootstrap: installing Debian's prometheus (prometheus and promtool)" >&2
    as_root apt-get update
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        prometheus
    # Where systemd runs, the package also starts a Prometheus on :9090 of every interface.
    if [ -d /run/systemd/system ]; then as_root systemctl disable --now prometheus || true; fi
fi

# wrk: the low-CPU load generator of kiln bench.
if ! command -v wrk >/dev/null 2>&1; then
    echo "bootstrap: installing Debian's wrk" >&2
    as_root apt-get update
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y wrk
fi

# Headless Chromium renders the load-test report in the tests.
if ! command -v chromium >/dev/null 2>&1; then
    echo "bootstrap: installing Debian's chromium" >&2
    as_root apt-get update
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium
fi

# nginx is the front proxy of Kiln's container (docs/deploy.md), run on the host by the
# entrypoint's tests; haproxy is the load balancer of the rolling-restart drill.
for tool in nginx haproxy; do
    if ! command -v "$tool" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$tool" ]; then
        echo "bootstrap: installing Debian's $tool" >&2
        as_root apt-get update
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$tool"
    fi
done

if [ ! -x "$VENV/bin/python" ]; then
    echo "bootstrap: creating $VENV" >&2
    "$PYTHON" -m venv "$VENV"
fi

stamp="$VENV/.kiln-installed"
want="$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16) $EXTRAS"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "bootstrap: installing kiln[$EXTRAS] into $VENV" >&2
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[$EXTRAS]"
    echo "$want" > "$stamp"
fi
