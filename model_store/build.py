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
from kiln.model_store import archive, archived_digest, read_archive
from kiln.training.artifacts import FORMS
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
    backend = next((form for form, fname in FORMS.items() if fname == serialized), None)
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


def ensure_built(name: str, backend: str | None = None, store: Path | None = None,
                 models_dirs: list[Path] | None = None, version: str | None = None) -> Path:
    """Path of an up-to-date NAME.mar (NAME-V.mar for a `version`) in `store` (default: the
    workspace's), building what it needs.

    An archive is rebuilt only when what it is made from changed, when it is not one this
    Kiln builds, or when `backend` (a flag given) is not the one it holds. `kiln archive`'s
    choices outlive a plain `kiln serve`: without `backend` the archive keeps its own, and a
    rebuild keeps its handler options (--top-k, --intra-op-threads, --require-gpu); only the
    response timeout follows the declaration again."""
    decl = declaration.get(name, models_dirs)
    name = decl.name
    dirs = [*(models_dirs or []), decl.folder]
    folder = Workspace.current().exports(name)
    store = store or Workspace.current().model_store
    _export_if_stale(decl, folder, dirs)
    mar = store / archive.archive_name(name, version)
    built_backend, built_config, shipped, metadata = archive_manifest(mar)
    if backend and built_backend and backend != built_backend:
        log.warning("%s: %s holds the %s export; rebuilding it with --backend %s", name, mar,
                    built_backend, backend)
    signature = json.loads((folder / "signature.json").read_text())
    backend = _exported(name, signature, backend or built_backend or "onnx")
    kept = archive.ArchiveConfig.read(built_config)
    # An archive of an older Kiln (workers and batching in its model-config.yaml, the whole
    # root shipped, no OIP metadata or other than its signature gives) reads back as none of
    # this Kiln's, and is rebuilt; so is one without the digest of these weights.
    if (kept is not None and backend == built_backend
            and archived_digest(mar) == archive.weights_digest(folder / FORMS[backend])
            and shipped == set(layout.worker_files())
            and metadata == oip.tensor_metadata(signature)
            and not stale(mar, archive.archive_inputs(decl, folder, backend))):
        log.info("%s: %s is up to date", name, mar)
        return mar
    options = kept.handler_options() if kept is not None else {}
    log.info("%s: archiving (%s%s)", name, backend,
             "".join(f", {k}={v} kept" for k, v in options.items()))
    config = archive.config_for(decl, **options)
    archive.build(name, backend, config, artifacts=folder, store=store, models_dirs=dirs,
                  version=version)
    return mar


def _export_if_stale(decl: declaration.Declaration, folder: Path, dirs: list[Path]) -> None:
    """Train (a recipe's model without weights) and export when the exports are missing or
    older than what they come from. Only then are torch and the training code imported
    (seconds, hundreds of MB): serving archives that are up to date needs neither."""
    if decl.recipe is not None:
        weights = [folder / "state_dict.pt", folder / "meta.json"]
        if not weights[0].exists():
            from kiln.training import train

            log.info("%s: no weights yet, training with the default settings", decl.name)
            train.train(train.config_for([decl.name, "--out", str(folder), *_dirs_args(dirs)]))
    else:
        weights = [decl.state_dict, *([decl.reference] if decl.reference else [])]
    if (stale(folder / "signature.json", [*weights, decl.path, *decl.source_files()])
            or _without_reference(decl, folder / "signature.json")):
        from kiln.training import export

        log.info("%s: exporting", decl.name)
        export.export(decl.name, folder, models_dirs=dirs)


def _without_reference(decl: declaration.Declaration, path: Path) -> bool:
    """An export from before signature.json held reference statistics, of a model that
    would get them now: exported again, or its archive would serve without drift scores."""
    if decl.recipe is None and decl.reference is None:
        return False
    return "reference" not in json.loads(path.read_text())


def _exported(name: str, signature: dict, backend: str) -> str:
    """`backend`, or the form that was exported when it was not."""
    exported = set(signature.get("parity", {}))
    if backend not in exported and exported:
        # A model ONNX cannot export is served by TorchScript (export said why).
        fallback = sorted(exported)[0]
        log.warning("%s: no %s export; archiving %s instead", name, backend, fallback)
        return fallback
    return backend


def _dirs_args(dirs: list[Path]) -> list[str]:
    return [arg for d in dirs for arg in ("--models-dir", str(d))]
