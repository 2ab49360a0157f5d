"""Which models a load test or a benchmark measures: any declared model by name, or, by
default, one picked from Kiln's default set by its place or by the kind of its input. No model
is named in the load tests' code."""

from __future__ import annotations

import argparse
from pathlib import Path

from kiln import declaration
from kiln.declaration import Declaration, DeclarationError


def add_model_argument(parser: argparse.ArgumentParser, kind: str | None = None) -> None:
    """--model NAME (default: see default_name) and --models-dir, for the studies."""
    of_kind = f" with one {kind} input" if kind else ""
    parser.add_argument("--model", help="declared model (or NAME.toml path) to measure "
                                        f"(default: the first of Kiln's default set{of_kind})")
    declaration.add_models_dir(parser)


def resolve(name: str, models_dirs: list[Path]) -> tuple[Declaration, list[Path]]:
    """The declaration of a name or NAME.toml path, and the folders that then find it by its
    name (a path's folder joins them)."""
    decl = declaration.get(name, models_dirs)
    return decl, list(models_dirs) if name == decl.name else [*models_dirs, decl.folder]


def input_kind(decl: Declaration) -> str | None:
    """The kind of the model's one input (image, features, tensor); None for several."""
    return decl.inputs[0]["kind"] if len(decl.inputs) == 1 else None


def default_name(kind: str | None = None) -> str:
    """The first model of Kiln's default set, or the first whose one input is of `kind`."""
    for name in declaration.default_set():
        if kind is None or input_kind(declaration.get(name)) == kind:
            return name
    of_kind = f" with one {kind} input" if kind else ""
    raise DeclarationError(f"Kiln's default set has no model{of_kind}; name one")


def chosen(parser: argparse.ArgumentParser, args: argparse.Namespace,
           kind: str | None = None) -> Declaration:
    """The declaration of --model, or of the default (see default_name); a model that is not
    declared ends the command with the declaration's message."""
    try:
        return declaration.get(args.model or default_name(kind), args.models_dirs)
    except DeclarationError as err:
        parser.error(str(err))
