#!/usr/bin/env bash
# A stand-in for the Dockerfile's default BASE (python:3.11-slim-bookworm) where no image
# registry answers: Debian bookworm from the machine's Debian mirror (debootstrap minbase with
# python3 and python3-venv; the same Python 3.11), committed with buildah under a local name.
# The root filesystem is kept as a tarball in CACHE, so that a second machine or a wiped
# container store makes the image again without debootstrap (about 50 s and 275 MB).
# Usage: local-base.sh CACHE NAME   (prints NAME once it is in buildah's store)
set -euo pipefail

if [ "$#" -ne 2 ]; then
    echo "usage: $0 CACHE NAME" >&2
    exit 2
fi
cache="$1"
name="$2"
mirror="${KILN_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
tarball="$cache/bookworm-minbase.tar"

if buildah inspect --type image "$name" >/dev/null 2>&1; then
    echo "$name"
    exit 0
fi
mkdir -p "$cache"
if [ ! -f "$tarball" ]; then
    root="$(mktemp -d "$cache/rootfs.XXXXXX")"
    trap 'rm -rf "$root"' EXIT
    debootstrap --variant=minbase --include=python3,python3-venv bookworm "$root" "$mirror" >&2
    # The suites python:3.11-slim-bookworm's apt reads: security fixes and updates too.
    printf 'deb %s bookworm main\ndeb %s bookworm-updates main\ndeb %s-security bookworm-security main\n' \
        "$mirror" "$mirror" "$mirror" >"$root/etc/apt/sources.list"
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    tar -C "$root" --numeric-owner -cf "$tarball.tmp" .
    mv "$tarball.tmp" "$tarball"
    rm -rf "$root"
fi
container="$(buildah from scratch)"
trap 'buildah rm "$container" >/dev/null' EXIT
buildah add "$container" "$tarball" / >/dev/null
buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 --cmd python3 "$container"
buildah commit --quiet "$container" "$name" >/dev/null
echo "$name"
