"""Kiln's one import root and the folders it spans.

`kiln` is one package whose subpackages live in the project's top-level folders
(pyproject.toml maps each of them; a test keeps the two lists equal). An archive ships the
whole root, laid out as an installed Kiln is, so that the copy inside a model folder never
hides half of an installed one.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

SUBPACKAGES = ("cli", "training", "training.models", "handlers", "model_store", "deploy",
               "loadtests", "batch")
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
    files = {}
    for name in ("kiln", *(f"kiln.{sub}" for sub in SUBPACKAGES)):
        prefix = name.replace(".", "/")
        for path in sorted(package_folder(name).iterdir()):
            if path.is_file() and (path.suffix == ".py" or path.suffix in DATA_SUFFIXES):
                files[f"{prefix}/{path.name}"] = path
    return files
