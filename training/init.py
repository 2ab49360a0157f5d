"""`kiln init`: write a model's declaration from its model file, its weights and a few flags.

The model is built and its weights loaded (weights_only=True) and it runs one dry forward
pass on inputs of the declared shapes, so a declaration that does not fit the model is
refused here, with the given shape and the model's own complaint, never at request time.
An example given with --expect is decoded as the server decodes it and must get that label.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path

import torch

from kiln import declaration
from kiln.console import run_command
from kiln.handlers import answers
from kiln.training import export

log = logging.getLogger("kiln.init")

LIST_KEYS = {"names", "labels", "mean", "std", "min", "max", "threshold", "units", "shape"}
NUMBER_KEYS = {"channels", "pad", "pixel_max", "max_length", "pad_value", "top_k"}


class InitError(ValueError):
    pass


def parse_spec(text: str, what: str) -> dict:
    """"KIND key=value ..." as a dict: lists split on commas, numbers parsed, size HxW."""
    words = text.split()
    if not words:
        raise InitError(f"{what}: empty; expected KIND key=value ...")
    spec = {"kind": words[0]}
    for word in words[1:]:
        key, sep, value = word.partition("=")
        if not sep:
            raise InitError(f"{what}: {word!r} is not key=value")
        spec[key] = _value(key, value.replace("+", " "))
    return spec


def _value(key: str, text: str):
    if key == "size":
        return [int(v) for v in re.split("[x,]", text)]
    if key in LIST_KEYS:
        items = [_scalar(v) for v in text.split(",")]
        return items if key not in ("names", "labels", "units") else [str(v) for v in items]
    if key in NUMBER_KEYS:
        return int(text)
    return _scalar(text)


def _scalar(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def declaration_table(args: argparse.Namespace, folder: Path) -> dict:
    inputs = []
    for i, text in enumerate(args.input):
        spec = parse_spec(text, f"--input #{i + 1}")
        spec.setdefault("name", "input" if len(args.input) == 1 else f"input_{i}")
        inputs.append({"name": spec.pop("name"), **spec})
    output = parse_spec(args.output, "--output")
    table = {"version": args.version, "description": args.description,
             "model": {"file": _relative(args.model_file, folder)},
             "weights": {"state_dict": _relative(args.weights, folder)},
             "inputs": inputs, "output": output}
    if args.class_name:
        table["model"]["class"] = args.class_name
    if args.args:
        table["model"]["args"] = json.loads(args.args)
    if args.requirement:
        table["model"]["requirements"] = list(args.requirement)
    if args.example:
        example = {"file": _relative(args.example, folder)}
        if args.expect is not None:
            example["expect"] = args.expect
        table["examples"] = [example]
    return table


def _relative(path: Path, folder: Path) -> str:
    path = path.resolve()
    try:
        return str(path.relative_to(folder.resolve()))
    except ValueError:
        return str(path)


def dry_run(decl: declaration.Declaration) -> tuple[list[int], torch.nn.Module]:
    """Builds the model, loads its weights and runs it once; returns the output's shape and
    the module that is exported (the model and its activation)."""
    model = decl.build()
    try:
        state = torch.load(decl.state_dict, weights_only=True)
        model.load_state_dict(state)
    except (RuntimeError, OSError, ValueError) as err:
        raise InitError(f"the weights in {decl.state_dict} do not load into "
                        f"{type(model).__name__}: {str(err).splitlines()[0]}") from None
    # A declaration Kiln does not train has its inputs' statistics filled in already.
    xs = export.random_inputs(list(decl.inputs), 2)
    served = export.served_module(decl, model)
    try:
        with torch.inference_mode():
            out = served(*xs)
    except Exception as err:  # whatever the model raises on a misfit input
        given = ", ".join(f"{spec['name']} {list(x.shape)}" for spec, x in zip(decl.inputs, xs,
                                                                               strict=True))
        raise InitError(f"the declared input does not fit the model: given {given}; "
                        f"the model says: {str(err).splitlines()[0]}") from None
    shape = [-1, *out.shape[1:]]
    try:
        export.check_output_fits(decl.output, shape)
    except export.ExportError as err:
        raise InitError(str(err)) from None
    return shape, served


def check_examples(decl: declaration.Declaration, served: torch.nn.Module) -> None:
    """Each example with an expected label gets it from the model, else InitError naming both:
    `kiln predict --expect` and the docs would otherwise promise an answer it never gives."""
    for example in decl.examples:
        if example.expect is None:
            continue
        if decl.output["kind"] not in answers.LABELLED_KINDS:
            raise InitError(f"--expect: a {decl.output['kind']} output has no label to expect")
        got = _label(decl, served, example)
        if got != example.expect:
            raise InitError(f"the example {example.file.name if example.file else 'value'} "
                            f"gets {got!r} from the model, but --expect says {example.expect!r}")


def _label(decl: declaration.Declaration, served: torch.nn.Module, example) -> str:
    """The label the server would answer for `example`, by the one answer path."""
    inputs = export.with_ranges([dict(spec) for spec in decl.inputs], decl)
    try:
        arrays = export.example_inputs(decl, example, {"inputs": export.signature_inputs(inputs)})
    except export.ExportError as err:
        raise InitError(str(err)) from None
    with torch.inference_mode():
        out = served(*(torch.from_numpy(a) for a in arrays))
    return answers.best(out.numpy(), decl.output)[0][0]


def init(args: argparse.Namespace) -> Path:
    folder = (args.out or args.model_file.parent).resolve()
    target = folder / f"{args.name}{declaration.SUFFIX}"
    if target.exists() and not args.force:
        raise InitError(f"{target} exists; --force replaces it")
    text = declaration.to_toml(declaration_table(args, folder))
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(text)
    try:
        decl = declaration.load(tmp)
        decl = declaration.Declaration(**{**vars(decl), "name": args.name, "path": target})
        shape, served = dry_run(decl)
        check_examples(decl, served)
    except (declaration.DeclarationError, InitError):
        tmp.unlink()
        raise
    tmp.replace(target)
    log.info("%s: the model answers %s for a batch of 2 (%s)", args.name, shape,
             decl.output["kind"])
    return target


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_file", type=Path, help="the .py file that defines the model")
    parser.add_argument("weights", type=Path, help="its state_dict, saved with torch.save")
    parser.add_argument("--name", required=True, help="the model's name (its endpoint)")
    parser.add_argument("--input", action="append", required=True, metavar="SPEC",
                        help='one per input of forward(), in order: "KIND key=value ...", '
                             'e.g. "features names=a,b,c", "image size=28x28 channels=1 '
                             'resize=fit", "tensor name=ids dtype=int64 shape=-1 '
                             'max_length=64 max=999"; a space inside a value is written +')
    parser.add_argument("--output", required=True, metavar="SPEC",
                        help='"KIND key=value ...", e.g. "multiclass labels=a,b,c '
                             'activation=softmax" or "regression names=price units=EUR"')
    parser.add_argument("--class", dest="class_name",
                        help="the nn.Module class (default: the file's only one)")
    parser.add_argument("--args", help="constructor keyword arguments as JSON (default: none)")
    parser.add_argument("--requirement", action="append", default=[],
                        help="a pip requirement the model needs (repeatable)")
    parser.add_argument("--example", type=Path, help="an example request body (a file)")
    parser.add_argument("--expect", help="the label the example must get")
    parser.add_argument("--version", default="1.0", help="model version (default: 1.0)")
    parser.add_argument("--description", default="", help="one line about the model")
    parser.add_argument("--out", type=Path,
                        help="folder for NAME.toml (default: the model file's folder)")
    parser.add_argument("--force", action="store_true", help="replace an existing NAME.toml")


def main(argv: list[str] | None = None) -> int:
    return run_command("kiln init", __doc__, add_arguments, run, argv)


def run(args: argparse.Namespace) -> int:
    try:
        target = init(args)
    except (InitError, declaration.DeclarationError) as err:
        log.error("%s", err)
        return 1
    print(target)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
