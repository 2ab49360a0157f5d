"""Kiln's one import root and the folders it spans.

`kiln` is one package whose subpackages live in the project's top-level folders
(pyproject.toml maps each of them; a test keeps the two lists equal). An archive ships only
what a TorchServe worker imports of it (worker_files), laid out as an installed Kiln is.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

SUBPACKAGES = ("cli", "training", "training.models", "handlers", "model_store", "deploy",
               "loadtests", "loadtests.studies",
               "loadtests.studies.reliability", "batch")
# All a worker imports of Kiln besides the root's __init__: the handler package imports
# nothing else of Kiln's (test_layout keeps it a leaf; test_worker_imports watches a worker).
WORKER_SUBPACKAGES = ("handlers",)
# What a package folder holds besides Python: configuration the code reads at run time.
DATA_SUFFIXES = (".yaml", ".xml", ".lua", ".toml")


def package_folder(name: str) -> Path:
    """The folder of `kiln` or of one of its subpackages, without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{name} is not a package")
    return Path(next(iter(spec.submodule_search_locations)))


def package_files() -> dict[str, Path]:
    """{path inside the root, as "kiln/handlers/rest.py": source file} for the whole root."""
    return _files(("kiln", *(f"kiln.{sub}" for sub in SUBPACKAGES)))


def worker_files() -> dict[str, Path]:
    """What an archive ships of Kiln: the root's __init__.py, so that `kiln` in the model
    folder is a regular package (a namespace one would yield to any other `kiln` on the
    path), and the packages a worker imports."""
    root = package_folder("kiln") / "__init__.py"
    return {"kiln/__init__.py": root, **_files(tuple(f"kiln.{s}" for s in WORKER_SUBPACKAGES))}


def _files(packages: tuple[str, ...]) -> dict[str, Path]:
    files = {}
    for name in packages:
        prefix = name.replace(".", "/")
        for path in sorted(package_folder(name).iterdir()):
            if path.is_file() and (path.suffix == ".py" or path.suffix in DATA_SUFFIXES):
                files[f"{prefix}/{path.name}"] = path
    return files
