"""Build model_store/NAME.mar: `kiln archive NAME` or `python -m kiln.model_store.archive NAME`.

The archive is self-describing: the serving core (`kiln/handlers/` under the root's
`__init__.py`), a three-line entry module for TorchServe, the declaration's model files (the
same ones training imports), the exported graph, signature.json, index_to_name.json, the OIP
metadata the plugin serves (oip-metadata.json) and a model-config.yaml with the handler's
options. It is built only from an export that passed the
parity gate. Workers and batching are not in it: `kiln serve` sets them (deploy/serving.py),
and TorchServe would let an archive's values win over the server's.

Why only the serving core: it is all of Kiln a worker imports. TorchServe puts the model
folder on the worker's PYTHONPATH ahead of site-packages, so `kiln` and `kiln.handlers` come
from the archive, and the archive serves the code it was built with, Kiln installed or not.
The `kiln/` there hides an installed Kiln's other subpackages from the worker, which never
imports them (tests/integration/test_worker_imports.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from kiln import declaration, layout
from kiln.console import run_command
from kiln.handlers import oip
from kiln.model_store import DIGEST_KEY, DIGEST_SECTION
from kiln.training.artifacts import FORMS, MAX_ABS_DIFF
from kiln.workspace import Workspace

log = logging.getLogger("kiln.archive")

# TorchServe imports the --handler file by its name and takes the one class it defines.
ENTRY_MODULE = "kiln_handler"
ENTRY_SOURCE = '''"""TorchServe's entry point: Kiln's handler, from the kiln package beside it."""

from kiln.handlers.handler import KilnHandler


class Handler(KilnHandler):
    """The one class TorchServe looks for in this file."""
'''


@dataclass
class ArchiveConfig:
    """What goes into the archive's model-config.yaml."""

    # TorchServe 0.12 takes a model's response timeout from its archive whenever the archive
    # has a model-config.yaml (120 s when the file leaves it out), never from config.properties;
    # Kiln's archives always have one (for the handler's options), so the timeout lives here.
    response_timeout_s: int = 30
    # None: the declaration's [output] top_k (3 unless it says), kept in the signature.
    top_k: int | None = None
    # "auto": the handler shares the machine's cores among all served workers.
    intra_op_threads: int | str = "auto"
    # Refuse to load (rather than fall back to the CPU) when TorchServe gives no GPU.
    require_gpu: bool = False

    def model_config(self) -> dict:
        handler = {"intra_op_threads": self.intra_op_threads, "require_gpu": self.require_gpu}
        if self.top_k is not None:
            handler = {"top_k": self.top_k, **handler}
        return {"responseTimeout": self.response_timeout_s, "handler": handler}

    @classmethod
    def read(cls, model_config: dict | None) -> ArchiveConfig | None:
        """The config an archive's model-config.yaml was written from; None for any other
        (an older Kiln's, with workers and batching in it, or a hand-made one)."""
        try:
            config = cls(response_timeout_s=model_config["responseTimeout"],
                         **model_config["handler"])
        except (KeyError, TypeError):
            return None
        # The weights digest is not a choice to keep: it is checked on its own.
        own = {k: v for k, v in model_config.items() if k != DIGEST_SECTION}
        return config if config.model_config() == own else None

    def handler_options(self) -> dict:
        """The handler options chosen other than Kiln's defaults (`kiln archive`'s flags)."""
        default = ArchiveConfig()
        return {k: getattr(self, k) for k in ("top_k", "intra_op_threads", "require_gpu")
                if getattr(self, k) != getattr(default, k)}


class ArchiveError(RuntimeError):
    pass


def weights_digest(serialized: Path) -> str:
    """sha256 of an exported form, which holds the graph and its weights: what makes a
    (name, version) mean the same model wherever it is served."""
    digest = hashlib.sha256()
    with open(serialized, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_config(config: ArchiveConfig, digest: str) -> dict:
    """The archive's model-config.yaml: the config's, and under `kiln` the weights digest
    (TorchServe ignores keys it does not know; the handler reads only `handler`)."""
    return {**config.model_config(), DIGEST_SECTION: {DIGEST_KEY: digest}}


def archive_name(name: str, version: str | None = None) -> str:
    """NAME.mar for the version `kiln serve` builds, NAME-V.mar for one `kiln deploy` adds."""
    return f"{name}.mar" if version is None else f"{name}-{version}.mar"


def check_parity(signature: dict, backend: str) -> None:
    """Refuse an export whose parity figures are missing or outside the gate."""
    figures = signature.get("parity", {}).get(backend)
    if not figures:
        raise ArchiveError(f"signature has no parity figures for {backend}: run kiln export")
    if figures["max_abs_diff"] > MAX_ABS_DIFF or figures["top1_agreement"] != 1.0:
        raise ArchiveError(f"{backend} export failed the parity gate: {figures}")


def archive_inputs(decl: declaration.Declaration, artifacts: Path, backend: str) -> list[Path]:
    """Every file the archive is built from (also what decides whether it is stale)."""
    return [artifacts / FORMS[backend], artifacts / "signature.json", decl.path,
            *decl.source_files(), *layout.worker_files().values()]


def config_for(decl: declaration.Declaration, **given) -> ArchiveConfig:
    """Kiln's defaults, then the declaration's response timeout, then what was given."""
    declared = {k: decl.serving[k] for k in ("response_timeout_s",) if k in decl.serving}
    return ArchiveConfig(**{**declared, **{k: v for k, v in given.items() if v is not None}})


def stage_package(folder: Path) -> Path:
    """Copies what a worker imports of `kiln` under folder (as folder/kiln/...) and returns
    folder."""
    for relative, source in layout.worker_files().items():
        target = folder / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    return folder


def build(name: str, backend: str = "onnx", config: ArchiveConfig | None = None,
          artifacts: Path | None = None, store: Path | None = None,
          models_dirs: list[Path] | None = None, version: str | None = None) -> Path:
    """The archive of the export in `artifacts`: NAME.mar with the declaration's version, or
    NAME-V.mar when `version` is given."""
    decl = declaration.get(name, models_dirs)
    name = decl.name
    config = config or config_for(decl)
    artifacts = artifacts or Workspace.current().exports(name)
    store = store or Workspace.current().model_store
    missing = [p for p in archive_inputs(decl, artifacts, backend) if not p.exists()]
    if missing:
        raise ArchiveError(f"missing {', '.join(map(str, missing))}: run kiln export {name}")
    signature = json.loads((artifacts / "signature.json").read_text())
    check_parity(signature, backend)
    store.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"kiln-{name}-") as tmp:
        staging = Path(tmp)
        labels = signature["output"].get("labels") or signature["output"].get("names") or []
        (staging / "index_to_name.json").write_text(
            json.dumps({str(i): label for i, label in enumerate(labels)}, indent=2))
        digest = weights_digest(artifacts / FORMS[backend])
        (staging / "model-config.yaml").write_text(
            yaml.safe_dump(model_config(config, digest), sort_keys=False))
        (staging / f"{ENTRY_MODULE}.py").write_text(ENTRY_SOURCE)
        (staging / oip.METADATA_FILE).write_text(json.dumps(oip.tensor_metadata(signature)))
        # A folder among --extra-files has its contents copied: this one holds kiln/.
        package = stage_package(staging / "package")
        extra = [artifacts / "signature.json", staging / "index_to_name.json",
                 staging / oip.METADATA_FILE, package, *decl.extra_files]
        if decl.requirements:
            (staging / "requirements.txt").write_text("\n".join(decl.requirements) + "\n")
        cmd = [
            str(Path(sys.executable).with_name("torch-model-archiver")),
            "--model-name", name,
            "--version", version or decl.version,
            "--model-file", str(decl.model_file),
            "--serialized-file", str(artifacts / FORMS[backend]),
            "--handler", str(staging / f"{ENTRY_MODULE}.py"),
            "--extra-files", ",".join(str(p) for p in extra),
            "--config-file", str(staging / "model-config.yaml"),
            "--export-path", str(staging),
            "--force",
            *(["--requirements-file", str(staging / "requirements.txt")]
              if decl.requirements else []),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise ArchiveError(f"torch-model-archiver failed:\n{done.stdout}{done.stderr}")
        target = store / archive_name(name, version)
        # Replace atomically: a running TorchServe or a reader never sees half an archive.
        shutil.move(str(staging / f"{name}.mar"), str(store / f".{target.name}.tmp"))
        (store / f".{target.name}.tmp").replace(target)
    log.info("%s archived (%s backend, %s) -> %s", name, backend,
             ", ".join(f"{k}={v}" for k, v in asdict(config).items()), target)
    return target


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = ArchiveConfig()
    parser.add_argument("name", help="model to archive: a declared name or a NAME.toml path")
    declaration.add_models_dir(parser)
    parser.add_argument("--backend", choices=list(FORMS), default="onnx",
                        help="exported form to serve: onnx (ONNX Runtime) or torchscript "
                             "(default: onnx)")
    parser.add_argument("--response-timeout", type=int, default=None,
                        help=f"seconds before a worker is deemed stuck (default: the "
                             f"declaration's [serving], else {d.response_timeout_s}); workers "
                             f"and batching are kiln serve's flags")
    parser.add_argument("--top-k", type=int, default=d.top_k,
                        help="classes listed in a multi-class answer (default: the "
                             "declaration's [output] top_k, else 3)")
    parser.add_argument("--intra-op-threads", type=_threads, default=d.intra_op_threads,
                        help=f"threads per worker inside the model (default: "
                             f"{d.intra_op_threads})")
    parser.add_argument("--require-gpu", action="store_true",
                        help="fail the model load instead of running on the CPU when no GPU "
                             "is given or CUDA is not obtained (default: off)")
    parser.add_argument("--artifacts", type=Path,
                        help="folder with the exports (default: the workspace's "
                             "artifacts/NAME)")
    parser.add_argument("--store", type=Path,
                        help="where to write NAME.mar (default: the workspace's model_store/)")
    parser.add_argument("--version",
                        help="write NAME-V.mar with this version, beside the served NAME.mar "
                             "(default: NAME.mar with the declaration's version)")


def _threads(text: str) -> int | str:
    if text == "auto":
        return text
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1 or auto")
    return value


def config_from_args(args: argparse.Namespace) -> ArchiveConfig:
    decl = declaration.get(args.name, args.models_dirs)
    return config_for(decl, response_timeout_s=args.response_timeout, top_k=args.top_k,
                      intra_op_threads=args.intra_op_threads, require_gpu=args.require_gpu)


def main(argv: list[str] | None = None) -> int:
    return run_command("kiln archive", __doc__, add_arguments, run, argv)


def run(args: argparse.Namespace) -> int:
    """The command for parsed arguments (shared by `python -m` and `kiln archive`)."""
    try:
        build(args.name, args.backend, config_from_args(args), args.artifacts, args.store,
              args.models_dirs, args.version)
    except (ArchiveError, declaration.DeclarationError) as err:
        log.error("%s", err)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
