#!/usr/bin/env bash
# Install what one verb needs and is missing, and nothing else.
#
#   scripts/bootstrap.sh serve   what `kiln serve` runs: a JDK, nginx, a venv with kiln and its
#                                runtime extra (KILN_RUNTIME: cpu, the default, or gpu)
#   scripts/bootstrap.sh test    that, and the test bench: Prometheus, wrk, h2load, Chromium,
#                                HAProxy and the test, parquet and ray extras
#   scripts/bootstrap.sh image   that, and what builds Kiln's image here (make image-check):
#                                buildah and debootstrap
#
# --dry-run prints the commands it would run and runs none; --plan prints all that a mode
# needs, installed or not. Safe to run again: Python packages are installed only when
# pyproject.toml changed or the mode needs an extra the venv lacks, so `serve` after `test`
# installs nothing and `test` after `serve` adds only the bench.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
RUNTIME="${KILN_RUNTIME:-cpu}"

# "Debian package: the commands it brings" (or the files, by their absolute path).
SERVE_APT=(
    # TorchServe runs on Java; javac builds Kiln's TorchServe plugin (deploy/oip_plugin) at
    # first serve.
    "openjdk-17-jdk-headless: java javac"
    # The front proxy of kiln serve and of Kiln's container: keys, limits, error pages.
    "nginx: nginx"
    # Its key check (a Lua table per worker: a key change needs no reload).
    "libnginx-mod-http-lua: /usr/lib/nginx/modules/ngx_http_lua_module.so"
)
TEST_APT=(
    # The metrics tests scrape TorchServe with a real Prometheus and lint with promtool.
    "prometheus: prometheus promtool"
    # The low-CPU load generator of kiln bench.
    "wrk: wrk"
    # kiln bench's OIP rows: one load generator for HTTP/1.1 and gRPC (HTTP/2).
    "nghttp2-client: h2load"
    # Headless Chromium renders the load-test report in the tests.
    "chromium: chromium"
    # The load balancer of the rolling-restart drill.
    "haproxy: haproxy"
)
# The image built and run without a registry or a container runtime (build-here.sh).
IMAGE_APT=(
    "buildah: buildah"
    "debootstrap: debootstrap"
)
SERVE_EXTRAS="$RUNTIME"
TEST_EXTRAS="$RUNTIME,parquet,ray,test"
# Installed with --no-deps beside the test extra, which holds what they import: KServe's SDK
# asks for protobuf<7, which our grpcio-tools refuses (pyproject.toml says more).
TEST_NO_DEPS=("kserve==0.21.0")

usage() {
    echo "usage: scripts/bootstrap.sh [--dry-run | --plan] serve|test|image" >&2
    exit 2
}

run() {
    if [ "$ACTION" = dry-run ]; then echo "$*"; else "$@"; fi
}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then run "$@"; else run sudo "$@"; fi
}

# nginx and haproxy live in /usr/sbin, which a user's PATH may lack.
have() {
    if [[ "$1" == /* ]]; then [ -e "$1" ]; return; fi
    command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]
}

# The packages of "$@" (table rows) that miss one of their commands.
missing_packages() {
    local row tool
    for row in "$@"; do
        for tool in ${row#*:}; do
            if ! have "$tool"; then echo "${row%%:*}"; break; fi
        done
    done
}

install_apt() {
    local packages
    packages=$(missing_packages "$@" | tr '\n' ' ')
    [ -n "$packages" ] || return 0
    echo "bootstrap: installing Debian's $packages" >&2
    as_root apt-get update
    # shellcheck disable=SC2086  # one word per package
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        $packages
    # Where systemd runs, Debian's prometheus also starts one on :9090 of every interface.
    if [[ " $packages " == *" prometheus "* ]] && [ -d /run/systemd/system ]; then
        as_root systemctl disable --now prometheus || true
    fi
}

# The sorted union of comma-separated extras lists, without the runtime this mode does not
# want: onnxruntime and onnxruntime-gpu overwrite each other's files.
union_extras() {
    local other=gpu
    [ "$RUNTIME" = gpu ] && other=cpu
    echo "$@" | tr ', ' '\n\n' | grep -vx -e '' -e "$other" | sort -u | paste -sd,
}

install_python() {
    local wanted=$1 stamp="$VENV/.kiln-installed" digest had_digest="" had_extras="" extras
    if [ ! -x "$VENV/bin/python" ]; then
        echo "bootstrap: creating $VENV" >&2
        run "$PYTHON" -m venv "$VENV"
    fi
    digest=$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)
    if [ -f "$stamp" ]; then read -r had_digest had_extras < "$stamp" || true; fi
    extras=$(union_extras "$had_extras" "$wanted")
    if [ "$had_digest" = "$digest" ] && [ "$extras" = "$had_extras" ]; then return 0; fi
    echo "bootstrap: installing kiln[$extras] into $VENV" >&2
    run "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[$extras]"
    if [[ ",$extras," == *,test,* ]]; then
        run "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps \
            "${TEST_NO_DEPS[@]}"
    fi
    if [ "$ACTION" = dry-run ]; then
        echo "stamp $digest $extras"
    else
        echo "$digest $extras" > "$stamp"
    fi
}

ACTION=install
case "${1:-}" in
    --dry-run | --plan) ACTION=${1#--}; shift ;;
esac
[ $# -eq 1 ] || usage
case "$RUNTIME" in cpu | gpu) ;; *) echo "KILN_RUNTIME must be cpu or gpu" >&2; exit 2 ;; esac
case "$1" in
    serve) apt=("${SERVE_APT[@]}"); extras="$SERVE_EXTRAS" ;;
    test) apt=("${SERVE_APT[@]}" "${TEST_APT[@]}"); extras="$TEST_EXTRAS" ;;
    image) apt=("${SERVE_APT[@]}" "${TEST_APT[@]}" "${IMAGE_APT[@]}"); extras="$TEST_EXTRAS" ;;
    *) usage ;;
esac

if [ "$ACTION" = plan ]; then
    echo "apt ${apt[*]%%:*}"
    echo "extras $extras"
    exit 0
fi
install_apt "${apt[@]}"
install_python "$extras"
