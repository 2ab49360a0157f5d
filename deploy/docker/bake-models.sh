#!/usr/bin/env bash
# Bakes models into an image's model store at build time: `kiln serve`'s build step (train,
# export with its parity gate, archive), run as Kiln's own commands. The weights, exports and
# TensorBoard logs go to a scratch folder that is thrown away: the image keeps the archives.
# Usage: bake-models.sh STORE BACKEND NAME...   (BACKEND: onnx or torchscript)
set -euo pipefail

if [ "$#" -lt 3 ]; then
    echo "usage: $0 STORE BACKEND NAME..." >&2
    exit 2
fi
store="$1"
backend="$2"
shift 2
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

mkdir -p "$store"
for name in "$@"; do
    kiln train "$name" --out "$work/$name" --log-dir "$work/runs"
    kiln export "$name" --artifacts "$work/$name"
    kiln archive "$name" --backend "$backend" --artifacts "$work/$name" --store "$store"
done
