#!/usr/bin/env bash
# Builds OUT/kiln-oip.jar, the TorchServe frontend plugin that serves the Open Inference
# Protocol (deploy/plugins.py calls it at the first serve, with a folder in Kiln's cache).
# Compiled against the model-server.jar of the installed torchserve, so a TorchServe upgrade
# that changes the frontend API fails here, not at serving time.
# Usage: build.sh OUT [PYTHON]  (the Python whose torchserve to compile against; default: python3)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:?usage: build.sh OUT [PYTHON]}"
python="${2:-python3}"
if ! command -v javac >/dev/null; then
    echo "javac not found: install openjdk-17-jdk-headless to build the OIP plugin" >&2
    exit 1
fi
frontend="$("$python" -c 'import pathlib, ts; print(pathlib.Path(ts.__file__).parent / "frontend" / "model-server.jar")')"
classes="$(mktemp -d)"
trap 'rm -rf "$classes"' EXIT
javac --release 11 -proc:none -Xlint:all -Werror -cp "$frontend" -d "$classes" "$here"/src/kiln/oip/*.java
# The greedy-batching agent (GreedyBatching.java) uses the JDK's own ASM, which --release cannot
# see: compiled for the JDK that runs it, with the package exported as the vmargs export it.
javac -proc:none -Xlint:all -Werror --add-exports java.base/jdk.internal.org.objectweb.asm=ALL-UNNAMED \
    -d "$classes" "$here"/src/kiln/batching/*.java
cp -r "$here/META-INF" "$classes/"
mkdir -p "$out"
printf 'Premain-Class: kiln.batching.GreedyBatching\n' >"$classes.mf"
jar --create --file "$out/kiln-oip.jar.tmp" --manifest "$classes.mf" -C "$classes" .
rm "$classes.mf"
mv "$out/kiln-oip.jar.tmp" "$out/kiln-oip.jar"
echo "built $out/kiln-oip.jar"
