"""Builds TorchServe model archives; the built .mar files live here too (git-ignored)."""

import json
import zipfile
from pathlib import Path

import yaml

STORE = Path(__file__).resolve().parent


def read_archive(mar: Path) -> tuple[dict | None, dict | None]:
    """(MANIFEST.json, model-config.yaml) read back from inside an archive; None for what is
    missing or unreadable."""
    try:
        with zipfile.ZipFile(mar) as z:
            manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))
            config = yaml.safe_load(z.read("model-config.yaml"))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, yaml.YAMLError):
        return None, None
    return manifest, config if isinstance(config, dict) else None


def archive_config(mar: Path) -> dict | None:
    """The archive's model-config.yaml as a dict, or None."""
    return read_archive(mar)[1]
