"""Train, export and archive whatever is missing or out of date, in that order.

This is what lets a second `make serve` start in seconds: each step runs only when its
product is absent or older than what it is made from.
"""

from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path

from kiln import declaration, layout
from kiln.handlers import oip
from kiln.model_store import archive, read_archive
from kiln.training import export, train
from kiln.workspace import Workspace

log = logging.getLogger("kiln.build")


def stale(target: Path, inputs: list[Path]) -> bool:
    if not target.exists():
        return True
    built = target.stat().st_mtime
    return any(p.stat().st_mtime > built for p in inputs)


def archive_manifest(mar: Path) -> tuple[str | None, dict | None, set[str], dict | None]:
    """(backend, model-config, its files under kiln/, its OIP metadata) of an existing
    archive, read back from inside it."""
    manifest, config = read_archive(mar)
    if manifest is None:
        return None, None, set(), None
    serialized = manifest.get("model", {}).get("serializedFile")
    backend = next((form for form, fname in export.FORMS.items() if fname == serialized), None)
    return backend, config, shipped_package(mar), shipped_metadata(mar)


def shipped_metadata(mar: Path) -> dict | None:
    try:
        with zipfile.ZipFile(mar) as z:
            return json.loads(z.read(oip.METADATA_FILE))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None


def shipped_package(mar: Path) -> set[str]:
    try:
        with zipfile.ZipFile(mar) as z:
            return {name for name in z.namelist() if name.startswith("kiln/")}
    except (OSError, zipfile.BadZipFile):
        return set()


def ensure_built(name: str, backend: str = "onnx", store: Path | None = None,
                 models_dirs: list[Path] | None = None, version: str | None = None) -> Path:
    """Path of an up-to-date NAME.mar (NAME-V.mar for a `version`) in `store` (default: the
    workspace's), building what it needs."""
    decl = declaration.get(name, models_dirs)
    name = decl.name
    dirs = [*(models_dirs or []), decl.folder]
    folder = Workspace.current().exports(name)
    store = store or Workspace.current().model_store
    if decl.recipe is not None:
        weights = [folder / "state_dict.pt", folder / "meta.json"]
        if not weights[0].exists():
            log.info("%s: no weights yet, training with the default settings", name)
            train.train(train.config_for([name, "--out", str(folder), *_dirs_args(dirs)]))
    else:
        weights = [decl.state_dict]
    signature = folder / "signature.json"
    if stale(signature, [*weights, decl.path, *decl.source_files()]):
        log.info("%s: exporting", name)
        export.export(name, folder, models_dirs=dirs)
    exported = set(json.loads(signature.read_text()).get("parity", {}))
    if backend not in exported and exported:
        # A model ONNX cannot export is served by TorchScript (export said why).
        fallback = sorted(exported)[0]
        log.warning("%s: no %s export; archiving %s instead", name, backend, fallback)
        backend = fallback
    mar = store / archive.archive_name(name, version)
    inputs = archive.archive_inputs(decl, folder, backend)
    # Its model-config.yaml holds the handler's options and the response timeout; an archive
    # from before workers and batching moved to kiln serve differs here too, and is rebuilt,
    # as is one that ships other files of Kiln than a worker imports (the whole root, once),
    # or other OIP metadata than its signature gives (or none, as before the plugin read it).
    # Its weights digest too: an archive without one (or another) is rebuilt.
    digest = archive.weights_digest(folder / export.FORMS[backend])
    wanted = (backend, archive.model_config(archive.config_for(decl), digest),
              set(layout.worker_files()),
              oip.tensor_metadata(json.loads(signature.read_text())))
    if stale(mar, inputs) or archive_manifest(mar) != wanted:
        log.info("%s: archiving (%s)", name, backend)
        archive.build(name, backend, artifacts=folder, store=store, models_dirs=dirs,
                      version=version)
    else:
        log.info("%s: %s is up to date", name, mar)
    return mar


def _dirs_args(dirs: list[Path]) -> list[str]:
    return [arg for d in dirs for arg in ("--models-dir", str(d))]
