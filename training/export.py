"""Export a declared model to TorchScript and ONNX, gated on parity with eager PyTorch.

`kiln export NAME` loads the model's weights (artifacts/NAME/state_dict.pt for a model Kiln
trained, else the declaration's state_dict, always weights_only=True) and writes model.ts,
model.onnx and signature.json (see docs/signature.md). Each exported form must agree with
eager PyTorch on the declaration's examples (decoded as the server decodes them) and on the
test split, or for a user's model on random inputs in the declared ranges; else nothing is
written and the command fails with the figures. A model ONNX cannot export is served by
TorchScript, with the operator named.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import os
import re
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kiln import declaration
from kiln.console import run_command
from kiln.handlers import errors, kinds, rest
from kiln.handlers import inputs as serving_inputs
from kiln.handlers.signature import check_signature
from kiln.training import recipes, reference
from kiln.training.artifacts import FORMS, MAX_ABS_DIFF
from kiln.training.train import git_sha
from kiln.workspace import Workspace

log = logging.getLogger("kiln.export")

# The graph's output tensor, by output kind.
OUTPUT_NAMES = {"multiclass": "probabilities", "binary": "probabilities",
                "multilabel": "probabilities", "regression": "values", "raw": "output"}
# Colour codes the exporter puts in its messages, which a log file should not carry.
ANSI = re.compile(r"\x1b\[[0-9;]*m")
RANDOM_ROWS = 64  # random inputs in the declared ranges, beside examples and the test split
SIGNATURE_VERSION = 2


class ParityError(RuntimeError):
    pass


class ExportError(RuntimeError):
    """The model cannot be exported in a form; the message names the operator when known."""


@dataclass
class Parity:
    max_abs_diff: float
    top1_agreement: float
    samples: int
    tolerance: float = MAX_ABS_DIFF

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance and self.top1_agreement == 1.0


class _Activation(nn.Module):
    """The declared activation after a model of several inputs (nn.Sequential takes one)."""

    def __init__(self, model: nn.Module, activation: nn.Module) -> None:
        super().__init__()
        self.model, self.activation = model, activation


class _TwoInputs(_Activation):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.activation(self.model(a, b))


class _ThreeInputs(_Activation):
    def forward(self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.activation(self.model(a, b, c))


def served_module(decl: declaration.Declaration, model: nn.Module) -> nn.Module:
    """What is exported: the model and its declared activation, so that every form answers
    what the output kind means (probabilities for classifiers)."""
    activation = {"softmax": nn.Softmax(dim=1), "sigmoid": nn.Sigmoid()}.get(decl.activation)
    n_inputs = len(decl.inputs)
    if n_inputs == 1:
        return (model if activation is None else nn.Sequential(model, activation)).eval()
    wrappers = {2: _TwoInputs, 3: _ThreeInputs}
    if n_inputs not in wrappers:
        raise ExportError(f"{decl.name}: {n_inputs} inputs; Kiln exports models of 1 to 3")
    return wrappers[n_inputs](model, activation or nn.Identity()).eval()


def export_torchscript(module: nn.Module, path: Path) -> None:
    with warnings.catch_warnings():
        # TorchScript is deprecated in torch 2.13 but is still what TorchServe's stock
        # handlers load; Kiln keeps it as the second backend.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*deprecated.*")
        torch.jit.script(module).save(str(path))


def export_onnx(module: nn.Module, inputs: list[dict], example: tuple, output_name: str,
                path: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=65536)
    # Variable-length tensor inputs share one length: a batch pads them together.
    length = torch.export.Dim("length", min=1, max=max(
        [spec.get("max_length", 1) for spec in inputs] + [2]))
    dynamic = tuple({0: batch, **{i + 1: length for i, d in enumerate(graph_shape(spec)[1:])
                                  if d == -1}} for spec in inputs)
    # The dynamo exporter prints progress and warnings of torch.export internals that say
    # nothing about our models; keep them out of the user's terminal unless it fails.
    chatter = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(chatter):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module, example, str(path),
                input_names=[spec["name"] for spec in inputs], output_names=[output_name],
                dynamic_shapes=dynamic,
                external_data=False,  # one self-contained file for the archive
                verbose=False,
            )
    except Exception as err:  # the exporter raises many types; all mean "cannot export"
        raise ExportError(onnx_failure(err)) from err
    import onnx

    onnx.checker.check_model(str(path))


def onnx_failure(err: Exception) -> str:
    """A short reason for a failed ONNX export, naming the operator where the error does."""
    text = ANSI.sub("", f"{type(err).__name__}: {err}")
    operator = re.search(r"\b(aten[:.]{1,2}[A-Za-z0-9_]+)", text)
    if operator:
        return (f"ONNX has no export for operator {operator.group(1)}: serve TorchScript, "
                "or replace the operator in the model")
    return f"ONNX export failed: {text.strip().splitlines()[0][:300]}"


def top1(output: dict, probs: np.ndarray) -> np.ndarray | None:
    """What each row's answer picks, for the agreement figure; None where nothing is picked."""
    kind = output["kind"]
    if kind == "binary":
        return (probs[:, 0] >= output.get("threshold", 0.5)).astype(np.int64)
    if kind == "multiclass":
        return probs.argmax(axis=1)
    if kind == "multilabel":
        return (probs >= np.asarray(output.get("threshold", 0.5))).astype(np.int64)
    return None


def compare(output: dict, reference: np.ndarray, candidate: np.ndarray) -> Parity:
    picks = top1(output, reference)
    agreement = 1.0 if picks is None else float(
        (picks == top1(output, candidate)).reshape(len(reference), -1).all(axis=1).mean())
    tolerance = MAX_ABS_DIFF
    if output["kind"] in ("regression", "raw"):  # values in their own units: relative
        tolerance = MAX_ABS_DIFF * max(1.0, float(np.abs(reference).max()))
    return Parity(max_abs_diff=float(np.abs(reference - candidate).max()),
                  top1_agreement=agreement, samples=len(reference), tolerance=tolerance)


def run_onnx(path: Path, xs: list[np.ndarray], names: list[str]) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, dict(zip(names, xs, strict=True)))[0]


def run_torchscript(path: Path, xs: list[np.ndarray], names: list[str]) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.jit.load(str(path), map_location="cpu")
    with torch.inference_mode():
        return module(*(torch.from_numpy(x) for x in xs)).numpy()


RUNNERS = {"onnx": run_onnx, "torchscript": run_torchscript}


def check_parity(output: dict, names: list[str], module: nn.Module, paths: dict[str, Path],
                 xs: tuple[torch.Tensor, ...]) -> dict[str, Parity]:
    with torch.inference_mode():
        reference = module(*xs).numpy()
    xs_np = [x.numpy() for x in xs]
    results = {}
    for form, path in paths.items():
        runner = RUNNERS[form]
        parity = compare(output, reference, runner(path, xs_np, names))
        # The batch dimension must really be dynamic: one row alone gives the same answer.
        single = runner(path, [x[:1] for x in xs_np], names)
        if single.shape != reference[:1].shape:
            raise ParityError(f"{form}: a batch of one gives shape {list(single.shape)}, "
                              f"expected {list(reference[:1].shape)}")
        parity.max_abs_diff = max(parity.max_abs_diff,
                                  float(np.abs(single - reference[:1]).max()))
        results[form] = parity
    return results


# --- the inputs the gate runs on ------------------------------------------------------------


def graph_shape(spec: dict) -> list[int]:
    """An input's graph shape, batch first (-1)."""
    return kinds.of(spec).graph_shape(spec)


def random_inputs(inputs: list[dict], rows: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Graph inputs drawn in each input's declared range (kinds.py says how, by kind)."""
    rng = np.random.default_rng(seed)
    return tuple(torch.from_numpy(kinds.of(spec).random_rows(spec, rows, rng))
                 for spec in inputs)


def with_ranges(inputs: list[dict], decl) -> list[dict]:
    """The inputs with each features input's ranges, as the declaration states them now (not
    as they were at training), written as the signature's min and max."""
    out = []
    for spec, declared in zip(inputs, decl.inputs, strict=True):
        spec = {k: v for k, v in spec.items() if k != "ranges"}
        if declared.get("ranges"):  # only features inputs declare ranges
            try:
                spec.update(declaration.feature_bounds({**spec, "ranges": declared["ranges"]}))
            except declaration.DeclarationError as err:
                raise ExportError(f"input {spec['name']!r}: {err}") from None
        out.append(spec)
    return out


def gate_inputs(decl, inputs: list[dict], prepared=None) -> tuple[torch.Tensor, ...]:
    """The declaration's examples, decoded as the server decodes them, the test split (a
    model Kiln trained: `prepared`, its recipe's splits) and random inputs in the declared
    ranges, the same on every run."""
    parts = [[x.numpy() for x in random_inputs(inputs, RANDOM_ROWS)]]
    if prepared is not None:
        parts.insert(0, [np.asarray(x) for x in prepared.splits["test"][0]])
    served = {"inputs": signature_inputs(inputs)}
    examples = [example_inputs(decl, example, served) for example in decl.examples]
    joined = serving_inputs.join([*examples, *parts], served)
    return tuple(torch.from_numpy(np.ascontiguousarray(x)) for x in joined)


def example_inputs(decl, example, served: dict) -> list[np.ndarray]:
    """One example's model inputs; an example the server would refuse fails the export."""
    try:
        arrays, _ = rest.decode_body(example.body(), served)
    except errors.BadInput as err:
        where = example.file or json.dumps(example.value)[:60]
        raise ExportError(f"example {where} would get a 400 from the server: {err}") from None
    return arrays


# --- the signature ---------------------------------------------------------------------------


def signature_inputs(inputs: list[dict]) -> list[dict]:
    described = []
    for spec in inputs:
        entry = {"name": spec["name"], "kind": spec["kind"],
                 "dtype": kinds.of(spec).dtype(spec), "shape": graph_shape(spec)}
        entry.update({k: v for k, v in spec.items() if k not in ("name", "kind", "dtype", "shape")})
        described.append(entry)
    return described


def signature_output(output: dict, shape: list[int]) -> dict:
    kind = output["kind"]
    entry = {"name": OUTPUT_NAMES[kind], "dtype": "float32", "shape": shape, "kind": kind}
    if kind in ("multiclass", "binary", "multilabel"):
        entry["labels"] = [str(label) for label in output["labels"]]
    if kind == "multiclass":
        entry["top_k"] = output.get("top_k", 3)
    elif kind in ("binary", "multilabel"):
        entry["threshold"] = output.get("threshold", 0.5)
    elif kind == "regression":
        entry["names"] = [str(n) for n in output["names"]]
        entry["units"] = output.get("units")
    return entry


def check_output_fits(output: dict, shape: list[int]) -> None:
    """The declared output against what a dry forward pass returned."""
    kind, width = output["kind"], (shape[1] if len(shape) == 2 else None)
    expected = {"binary": 1, "multiclass": len(output.get("labels") or []),
                "multilabel": len(output.get("labels") or []),
                "regression": len(output.get("names") or [])}.get(kind)
    if expected is not None and width != expected:
        raise ExportError(f"the model returns shape {shape}, but a {kind} output with "
                          f"{expected} {'names' if kind == 'regression' else 'labels'} needs "
                          f"[-1, {expected}]")


def signature(decl, meta: dict, inputs: list[dict], output: dict, shape: list[int],
              parity: dict[str, Parity]) -> dict:
    return {
        "signature_version": SIGNATURE_VERSION,
        "name": decl.name,
        "version": decl.version,
        "inputs": signature_inputs(inputs),
        "output": signature_output(output, shape),
        "parity": {form: vars(p) for form, p in parity.items()},
        "provenance": {
            "model_class": meta["model_class"],
            "git_sha": git_sha(),
            "trained_git_sha": meta.get("git_sha"),
            "seed": meta.get("seed"),
            "data_sha256": meta.get("data_sha256"),
            "weights_sha256": meta.get("weights_sha256"),
            "metrics": meta.get("metrics", {}),
            "torch_version": torch.__version__,
            "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
        },
    }


def training_reference(decl, prepared, inputs: list[dict], output: dict,
                       shape: list[int]) -> dict | None:
    """signature.json's reference statistics: of the recipe's training split, else of the
    declaration's [weights] reference, else none (served without drift scores)."""
    served_inputs, served_output = signature_inputs(inputs), signature_output(output, shape)
    if prepared is not None:
        train_x, train_y = prepared.splits["train"]
        return reference.reference(served_inputs, served_output,
                                   [x.numpy() for x in train_x], train_y.numpy())
    if decl.reference is None:
        return None
    try:
        return reference.declared(decl.reference, served_inputs, served_output)
    except ValueError as err:
        raise ExportError(f"[weights] reference: {err}") from None


def load_weights(decl, folder: Path) -> tuple[nn.Module, dict]:
    """The model with its weights, and what is known of how they were made."""
    model = decl.build()
    if decl.recipe is not None:
        meta = json.loads((folder / "meta.json").read_text())
        weights = folder / "state_dict.pt"
    else:
        weights = decl.state_dict
        meta = {"model_class": type(model).__name__,
                "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}
    model.load_state_dict(torch.load(weights, weights_only=True))
    return model, meta


def export(name: str, artifacts: Path | None = None,
           models_dirs: list[Path] | None = None) -> dict:
    decl = declaration.get(name, models_dirs)
    folder = artifacts or Workspace.current().exports(decl.name)
    folder.mkdir(parents=True, exist_ok=True)
    model, meta = load_weights(decl, folder)
    inputs = with_ranges(meta.get("inputs") or [dict(spec) for spec in decl.inputs], decl)
    output = meta.get("output") or dict(decl.output)
    module = served_module(decl, model)
    prepared = recipes.prepare(decl) if decl.recipe is not None else None
    xs = gate_inputs(decl, inputs, prepared)
    with torch.inference_mode():
        out_shape = [-1, *module(*(x[:2] for x in xs)).shape[1:]]
    check_output_fits(output, out_shape)
    found = training_reference(decl, prepared, inputs, output, out_shape)

    # Write beside the final names and move into place only once parity holds, so a
    # failed export never leaves a file that an archive could pick up.
    tmp = {form: folder / f".{fname}.tmp" for form, fname in FORMS.items()}
    try:
        exported = {}
        try:
            export_torchscript(module, tmp["torchscript"])
            exported["torchscript"] = tmp["torchscript"]
        except Exception as err:  # scripting fails on many dynamic Python constructs
            log.warning("%s: no TorchScript form: %s", decl.name, str(err).splitlines()[0])
        try:
            export_onnx(module, inputs, tuple(x[:2] for x in xs), OUTPUT_NAMES[output["kind"]],
                        tmp["onnx"])
            exported["onnx"] = tmp["onnx"]
        except ExportError as err:
            if not exported:
                raise
            log.warning("%s: %s; serving TorchScript only", decl.name, err)
        names = [spec["name"] for spec in inputs]
        parity = check_parity(output, names, module, exported, xs)
        for form, p in parity.items():
            log.info("%s %-11s max |diff| %.3g (limit %.3g)  top-1 agreement %.4f on %d rows",
                     decl.name, form, p.max_abs_diff, p.tolerance, p.top1_agreement, p.samples)
        failed = {f: p for f, p in parity.items() if not p.passed}
        if failed:
            raise ParityError("; ".join(
                f"{f}: max |diff| {p.max_abs_diff:.3g} (limit {p.tolerance:g}), "
                f"top-1 agreement {p.top1_agreement:.4f} (need 1.0)" for f, p in failed.items()))
        for form in FORMS:
            (folder / FORMS[form]).unlink(missing_ok=True)
        for form in exported:
            os.replace(tmp[form], folder / FORMS[form])
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)
    sig = signature(decl, meta, inputs, output, out_shape, parity)
    if found is not None:
        sig["reference"] = found
    check_signature(sig)
    (folder / "signature.json").write_text(json.dumps(sig, indent=2) + "\n")
    log.info("%s exported -> %s", decl.name,
             ", ".join(str(folder / FORMS[f]) for f in exported))
    return sig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="model to export: a declared name or a NAME.toml path")
    declaration.add_models_dir(parser)
    parser.add_argument("--artifacts", type=Path,
                        help="folder with state_dict.pt and meta.json (default: artifacts/NAME)")


def main(argv: list[str] | None = None) -> int:
    return run_command("kiln export", __doc__, add_arguments, run, argv)


def run(args: argparse.Namespace) -> int:
    """The command for parsed arguments (shared by `python -m` and `kiln export`)."""
    try:
        export(args.name, args.artifacts, args.models_dirs)
    except (ExportError, declaration.DeclarationError) as err:
        log.error("%s: nothing exported: %s", args.name, err)
        return 1
    except ParityError as err:
        log.error("%s: parity gate failed, nothing exported: %s", args.name, err)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
