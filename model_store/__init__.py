"""Builds TorchServe model archives; they are written to the workspace's model_store/
(kiln/workspace.py), which in Kiln's repository is this folder."""

import json
import zipfile
from pathlib import Path

import yaml

# Where model-config.yaml carries the sha256 of the archive's exported graph and weights.
DIGEST_SECTION, DIGEST_KEY = "kiln", "weights_digest"


def read_archive(mar: Path) -> tuple[dict | None, dict | None]:
    """(MANIFEST.json, model-config.yaml) read back from inside an archive; None for what is
    missing or unreadable."""
    try:
        with zipfile.ZipFile(mar) as z:
            manifest, config = (_read(z, "MAR-INF/MANIFEST.json", json.loads),
                                _read(z, "model-config.yaml", yaml.safe_load))
    except (OSError, zipfile.BadZipFile):
        return None, None
    return (manifest if isinstance(manifest, dict) else None,
            config if isinstance(config, dict) else None)


def archived_digest(mar: Path) -> str | None:
    """The weights digest an archive carries (None: an archive from before Kiln wrote one)."""
    _, config = read_archive(mar)
    section = (config or {}).get(DIGEST_SECTION)
    return section.get(DIGEST_KEY) if isinstance(section, dict) else None


def with_version(source: Path, out: Path, version: str) -> Path:
    """A copy of the archive `source` at `out` whose manifest says `version`: the same weights
    served as another version (for trying routes and shadows without training twice)."""
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zout:
        for item in zin.infolist():
            data = zin.read(item)
            if item.filename == "MAR-INF/MANIFEST.json":
                manifest = json.loads(data)
                manifest["model"]["modelVersion"] = version
                data = json.dumps(manifest).encode()
            zout.writestr(item, data)
    return out


def _read(z: zipfile.ZipFile, name: str, parse):
    try:
        return parse(z.read(name))
    except (KeyError, ValueError, yaml.YAMLError):
        return None
