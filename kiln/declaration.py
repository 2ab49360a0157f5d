"""Model declarations: one TOML file per model (docs/declaration.md), found in model folders.

Everything Kiln knows about a model comes from here: training, export, the archive, the
serving settings, `kiln predict`'s example, the load tests' payloads. Reading a declaration
imports no torch; building the model does.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kiln import layout
from kiln.handlers import kinds

if TYPE_CHECKING:
    import torch

# Kiln's own declarations sit beside their model files, which training imports.
BUILTIN_DIR = layout.package_folder("kiln.training.models")
MODELS_DIR_ENV = "KILN_MODELS_DIR"
SUFFIX = ".toml"

OUTPUT_KINDS = ("multiclass", "binary", "multilabel", "regression", "raw")
ACTIVATIONS = ("softmax", "sigmoid", "none")
SERVING_KEYS = ("workers", "batch_size", "max_batch_delay_ms", "response_timeout_s")
TRAIN_KEYS = ("epochs", "batch_size", "lr", "optimizer", "momentum", "weight_decay", "augment")
TOP_KEYS = ("version", "description", "serve_by_default", "model", "weights", "train", "inputs",
            "output", "serving", "examples")
# The graph's activation when the declaration names none: what each output kind means.
DEFAULT_ACTIVATION = {"multiclass": "softmax", "binary": "none", "multilabel": "none",
                      "regression": "none", "raw": "none"}


class DeclarationError(ValueError):
    """A declaration that cannot describe a servable model; the message names the file."""


@dataclass(frozen=True)
class Example:
    """An input that docs, `kiln predict`, load tests and checks use; `expect` is the label
    (or, for regression, nothing: the answer is checked for shape only)."""

    file: Path | None
    value: object | None  # an inline JSON value when there is no file
    expect: str | None

    def body(self) -> bytes:
        import json

        if self.file is not None:
            return self.file.read_bytes()
        return json.dumps(self.value).encode()


@dataclass(frozen=True)
class Declaration:
    name: str
    path: Path
    version: str
    description: str
    model_file: Path
    class_name: str | None
    args: dict
    extra_files: tuple[Path, ...]
    requirements: tuple[str, ...]
    recipe: str | None
    state_dict: Path | None
    train: dict
    inputs: tuple[dict, ...]
    output: dict
    serving: dict
    examples: tuple[Example, ...]
    serve_by_default: bool = True
    # The training inputs of a user's weights (.npy, or .npz by input name with an optional
    # `target`), for the reference statistics export stores (docs/signature.md).
    reference: Path | None = None

    @property
    def folder(self) -> Path:
        return self.path.parent

    @property
    def activation(self) -> str:
        return self.output.get("activation", DEFAULT_ACTIVATION[self.output["kind"]])

    def source_files(self) -> list[Path]:
        """What the archive ships of the model's own code, and what makes it stale."""
        return [self.model_file, *self.extra_files]

    def model_class(self) -> type[torch.nn.Module]:
        return load_model_class(self)

    def build(self) -> torch.nn.Module:
        return self.model_class()(**self.args)


# --- finding declarations --------------------------------------------------------------------


def model_dirs(extra: list[Path] | None = None) -> list[Path]:
    """Where declarations are looked for: Kiln's own, then KILN_MODELS_DIR, then `extra`."""
    dirs = [BUILTIN_DIR]
    env = os.environ.get(MODELS_DIR_ENV, "")
    dirs += [Path(p) for p in env.split(os.pathsep) if p]
    dirs += list(extra or [])
    seen, unique = set(), []
    for d in dirs:
        key = d.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(d)
    return unique


def discover(extra: list[Path] | None = None) -> dict[str, Path]:
    """{name: declaration file} over every model folder; a name declared twice is an error."""
    found: dict[str, Path] = {}
    for folder in model_dirs(extra):
        if not folder.is_dir():
            raise DeclarationError(f"models folder {folder} does not exist")
        for path in sorted(folder.glob(f"*{SUFFIX}")):
            name = path.stem
            if name in found:
                raise DeclarationError(
                    f"model {name!r} is declared twice: {found[name]} and {path}")
            found[name] = path
    return found


def add_models_dir(parser) -> None:
    """The --models-dir flag (dest models_dirs) of every command that resolves a name."""
    parser.add_argument("--models-dir", type=Path, action="append", default=[],
                        dest="models_dirs", metavar="DIR",
                        help="another folder of model declarations (repeatable; default: "
                             f"Kiln's own and ${MODELS_DIR_ENV})")


def names(extra: list[Path] | None = None) -> list[str]:
    return list(discover(extra))


def default_set() -> list[str]:
    """What `kiln serve` serves when it is given no name: Kiln's own models that say so."""
    return [name for name, path in discover([]).items()
            if path.parent == BUILTIN_DIR and load(path).serve_by_default]


def get(name_or_path: str, extra: list[Path] | None = None) -> Declaration:
    """The declaration of a model name, or of a path to a NAME.toml file."""
    if name_or_path.endswith(SUFFIX) or os.sep in name_or_path:
        path = Path(name_or_path)
        if not path.is_file():
            raise DeclarationError(f"no declaration at {path}")
        return load(path)
    found = discover(extra)
    if name_or_path not in found:
        known = ", ".join(found) or "none"
        raise DeclarationError(f"unknown model {name_or_path!r}; declared: {known} "
                               f"(add folders with --models-dir or {MODELS_DIR_ENV})")
    return load(found[name_or_path])


# --- reading one -----------------------------------------------------------------------------


def load(path: Path) -> Declaration:
    path = Path(path).resolve()
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise DeclarationError(f"{path}: {err}") from None
    try:
        return _parse(path, table)
    except DeclarationError as err:
        raise DeclarationError(f"{path}: {err}") from None


def _parse(path: Path, table: dict) -> Declaration:
    _no_unknown(table, TOP_KEYS, "the declaration")
    folder = path.parent
    model = _table(table, "model", required=True)
    _no_unknown(model, ("file", "class", "args", "extra_files", "requirements"), "[model]")
    if "file" not in model:
        raise DeclarationError("[model] needs file = \"the model's .py file\"")
    model_file = _existing(folder, model["file"], "[model] file")
    weights = _table(table, "weights", required=True)
    _no_unknown(weights, ("recipe", "state_dict", "reference"), "[weights]")
    if ("recipe" in weights) == ("state_dict" in weights):
        raise DeclarationError("[weights] needs exactly one of recipe or state_dict")
    recipe = weights.get("recipe")
    if recipe is not None:
        from kiln.training import recipes  # no torch: the recipe names only

        if recipe not in recipes.RECIPES:
            raise DeclarationError(f"unknown recipe {recipe!r}; Kiln has "
                                   f"{', '.join(recipes.RECIPES)}")
    state_dict = (_existing(folder, weights["state_dict"], "[weights] state_dict")
                  if "state_dict" in weights else None)
    if "reference" in weights and recipe is not None:
        raise DeclarationError("[weights] reference is for a user's weights: Kiln knows a "
                               "recipe's training data")
    reference = (_existing(folder, weights["reference"], "[weights] reference")
                 if "reference" in weights else None)
    train = _table(table, "train")
    _no_unknown(train, TRAIN_KEYS, "[train]")
    if train and recipe is None:
        raise DeclarationError("[train] applies only to a model Kiln trains ([weights] recipe)")
    inputs = tuple(_check_input(i, spec, recipe is not None)
                   for i, spec in enumerate(table.get("inputs") or []))
    if not inputs:
        raise DeclarationError("declare at least one [[inputs]] table")
    input_names = [spec["name"] for spec in inputs]
    if len(set(input_names)) != len(input_names):
        raise DeclarationError(f"input names must differ, got {input_names}")
    output = _check_output(_table(table, "output", required=True), recipe is not None)
    serving = _table(table, "serving")
    _no_unknown(serving, SERVING_KEYS, "[serving]")
    for key, value in serving.items():
        least = 0 if key == "max_batch_delay_ms" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise DeclarationError(f"[serving] {key} must be a whole number, got {value!r}")
    examples = tuple(_example(folder, e) for e in table.get("examples") or [])
    return Declaration(
        name=path.stem, path=path, version=str(table.get("version", "1.0")),
        description=str(table.get("description", "")), model_file=model_file,
        class_name=model.get("class"), args=dict(model.get("args") or {}),
        extra_files=tuple(_existing(folder, f, "[model] extra_files")
                          for f in model.get("extra_files") or []),
        requirements=tuple(model.get("requirements") or []), recipe=recipe,
        state_dict=state_dict, train=train, inputs=inputs, output=output, serving=serving,
        examples=examples, serve_by_default=bool(table.get("serve_by_default", True)),
        reference=reference,
    )


def _check_input(i: int, spec: dict, trained: bool) -> dict:
    where = f"[[inputs]] #{i + 1}"
    if not isinstance(spec, dict) or "name" not in spec or "kind" not in spec:
        raise DeclarationError(f"{where} needs a name and a kind")
    kind = spec["kind"]
    if kind not in kinds.NAMES:
        raise DeclarationError(f"{where}: kind {kind!r} is not one of {', '.join(kinds.NAMES)}")
    _no_unknown(spec, ("name", "kind", *kinds.of(spec).declared_keys), where)
    try:
        return kinds.of(spec).declared(dict(spec), trained, where)
    except ValueError as err:
        raise DeclarationError(str(err)) from None


def feature_bounds(spec: dict) -> dict:
    """A features input's declared ranges as the signature's min and max (one per name, null
    for an open side): {} when it declares none. Its names must be known (a recipe fills
    them in)."""
    ranges = spec.get("ranges")
    if not ranges:
        return {}
    names = spec["names"]
    unknown = [name for name in ranges if name not in names]
    if unknown:
        raise DeclarationError(f"ranges name unknown features {unknown}; the features are "
                               f"{names}")
    bounds = {}
    for key, side in (("min", 0), ("max", 1)):
        values = [ranges[n][side] if n in ranges else None for n in names]
        values = [float(v) if v is not None and abs(v) != float("inf") else None
                  for v in values]
        if any(v is not None for v in values):
            bounds[key] = values
    return bounds


def _check_output(spec: dict, trained: bool) -> dict:
    _no_unknown(spec, ("kind", "activation", "labels", "top_k", "threshold", "names", "units"),
                "[output]")
    kind = spec.get("kind")
    if kind not in OUTPUT_KINDS:
        raise DeclarationError(f"[output] kind {kind!r} is not one of {', '.join(OUTPUT_KINDS)}")
    if spec.get("activation", "none") not in ACTIVATIONS:
        raise DeclarationError(f"[output] activation must be one of {', '.join(ACTIVATIONS)}")
    if kind in ("multiclass", "binary", "multilabel") and not trained and not spec.get("labels"):
        raise DeclarationError(f"[output] a {kind} model needs labels = [...]")
    if kind == "binary" and "labels" in spec and len(spec["labels"]) != 2:
        raise DeclarationError("[output] a binary model has exactly 2 labels")
    if kind == "regression" and not spec.get("names") and not trained:
        raise DeclarationError("[output] a regression model needs names = [...]")
    return dict(spec)


def _example(folder: Path, entry: dict) -> Example:
    if not isinstance(entry, dict) or ("file" in entry) == ("value" in entry):
        raise DeclarationError("each [[examples]] needs exactly one of file or value")
    _no_unknown(entry, ("file", "value", "expect"), "[[examples]]")
    file = _existing(folder, entry["file"], "[[examples]] file") if "file" in entry else None
    expect = entry.get("expect")
    return Example(file=file, value=entry.get("value"),
                   expect=None if expect is None else str(expect))


def _table(table: dict, key: str, required: bool = False) -> dict:
    value = table.get(key)
    if value is None:
        if required:
            raise DeclarationError(f"missing [{key}]")
        return {}
    if not isinstance(value, dict):
        raise DeclarationError(f"{key} must be a table")
    return dict(value)


def _no_unknown(table: dict, known: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise DeclarationError(f"unknown key(s) {unknown} in {where}; known: {', '.join(known)}")


def _existing(folder: Path, relative: str, what: str) -> Path:
    path = (folder / relative).resolve()
    if not path.is_file():
        raise DeclarationError(f"{what} {relative!r}: no such file ({path})")
    return path


# --- the model class -------------------------------------------------------------------------


def load_model_class(decl: Declaration) -> type[torch.nn.Module]:
    """The nn.Module class the declaration names, imported from its file by path under one
    module name (kiln_model_NAME), so a model file never needs to be on sys.path."""
    from torch import nn

    module_name = f"kiln_model_{decl.name}"
    module = sys.modules.get(module_name)
    if module is None or getattr(module, "__file__", None) != str(decl.model_file):
        spec = importlib.util.spec_from_file_location(module_name, decl.model_file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        # A model file may import its extra files by their names: they sit beside it.
        added = str(decl.model_file.parent) not in sys.path and bool(decl.extra_files)
        if added:
            sys.path.insert(0, str(decl.model_file.parent))
        try:
            spec.loader.exec_module(module)
        except Exception:
            del sys.modules[module_name]
            raise
        finally:
            if added:
                sys.path.remove(str(decl.model_file.parent))
    classes = [obj for _, obj in inspect.getmembers(module, inspect.isclass)
               if obj.__module__ == module.__name__ and issubclass(obj, nn.Module)]
    if decl.class_name is not None:
        chosen = [c for c in classes if c.__name__ == decl.class_name]
        if not chosen:
            raise DeclarationError(f"{decl.path}: {decl.model_file.name} defines no nn.Module "
                                   f"named {decl.class_name!r}; it has "
                                   f"{[c.__name__ for c in classes]}")
        return chosen[0]
    if len(classes) != 1:
        raise DeclarationError(f"{decl.path}: {decl.model_file.name} defines "
                               f"{[c.__name__ for c in classes]}; name one with [model] class")
    return classes[0]


# --- writing one -----------------------------------------------------------------------------


def to_toml(table: dict) -> str:
    """TOML text for a declaration's table (the subset declarations use: scalars, lists of
    scalars, inline tables, tables and arrays of tables); tomllib reads it back equal."""
    lines = [f"{key} = {_toml_value(value)}" for key, value in table.items()
             if not isinstance(value, dict) and not _is_table_array(value)]
    for key, value in table.items():
        if isinstance(value, dict):
            lines += ["", f"[{key}]"]
            lines += [f"{k} = {_toml_value(v)}" for k, v in value.items()]
        elif _is_table_array(value):
            for item in value:
                lines += ["", f"[[{key}]]"]
                lines += [f"{k} = {_toml_value(v)}" for k, v in item.items()]
    return "\n".join(lines).lstrip("\n") + "\n"


def _is_table_array(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _toml_value(value) -> str:
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}"
                               for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} to TOML: {value!r}")


def _toml_key(key: str) -> str:
    import json

    bare = key.replace("_", "").replace("-", "").isalnum() and key.isascii()
    return key if bare else json.dumps(key)
