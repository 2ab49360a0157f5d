#!/usr/bin/env bash
# Builds Kiln's CPU image on a machine with buildah and no image registry (docs/deploy.md,
# "The image, built and run here"): the base from Debian's mirror (local-base.sh), the Python
# wheels downloaded on the host with the host's pip configuration (torch's CPU wheel is not on
# PyPI under its name) and mounted read-only while pip runs in the build, nothing fetched by
# pip inside. Build steps run with chroot isolation: no container runtime is needed.
# Usage: build-here.sh [TAG]   (default localhost/kiln:cpu-check; MODELS="lenet binary" unless
# set in the environment). Cache: KILN_IMAGE_CACHE (default ~/.cache/kiln/image), holding the
# base's root filesystem and the wheels for the current pyproject.toml, nothing older.
set -euo pipefail
cd "$(dirname "$0")/../.."

tag="${1:-localhost/kiln:cpu-check}"
models="${MODELS-lenet binary}"
cache="${KILN_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kiln/image}"
python="${PYTHON:-.venv/bin/python}"
wheels="$cache/wheels"

base="$(deploy/docker/local-base.sh "$cache" localhost/kiln-base:bookworm)"

# The wheels for this pyproject.toml (the cpu and tracing extras, and the build backend), for
# the base's Python 3.11; a changed pyproject.toml starts the folder afresh.
stamp="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ "$(cat "$wheels/.pyproject.sha256" 2>/dev/null)" != "$stamp" ]; then
    rm -rf "$wheels"
    "$python" -m pip download --quiet --dest "$wheels" --only-binary=:all: \
        --python-version 3.11 ".[cpu,tracing]" "setuptools>=68"
    echo "$stamp" >"$wheels/.pyproject.sha256"
fi

old="$(buildah inspect --type image --format '{{.FromImageID}}' "$tag" 2>/dev/null || true)"
containers="$(buildah containers --quiet --notruncate | sort)"
# PIP_INDEX_URL at the wheels folder too: pip inside the build reaches no index. Docker's image
# format, as docker build makes: OCI's has no HEALTHCHECK.
buildah bud --isolation chroot --layers=false --format docker \
    -f deploy/docker/Dockerfile -t "$tag" \
    --build-arg BASE="$base" --build-arg MODELS="$models" \
    --build-arg PIP_FIND_LINKS=/hostwheels --build-arg PIP_INDEX_URL=file:///hostwheels \
    -v "$wheels:/hostwheels:ro" .
new="$(buildah inspect --type image --format '{{.FromImageID}}' "$tag")"
# buildah 1.28 leaves the working container of the `FROM scratch AS wheels` stage behind.
comm -13 <(echo "$containers") <(buildah containers --quiet --notruncate | sort) \
    | xargs --no-run-if-empty buildah rm >/dev/null
# The image this tag named before, untagged now: removed, so that rebuilds do not pile up.
if [ -n "$old" ] && [ "$old" != "$new" ]; then
    buildah rmi "$old" >/dev/null || true
fi
