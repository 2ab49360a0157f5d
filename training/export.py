"""Export a trained model to TorchScript and ONNX, gated on parity with eager PyTorch.

`kiln export NAME` reads artifacts/NAME/state_dict.pt and meta.json and writes model.ts,
model.onnx and signature.json (see docs/signature.md). Each exported form must agree with
eager PyTorch on the whole test split, else nothing is written and the command fails with
the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kiln.console import setup_logging
from kiln.training import data, registry
from kiln.training.train import ARTIFACTS, git_sha, prepare

log = logging.getLogger("kiln.export")

MAX_ABS_DIFF = 1e-4
INPUT_NAME = "input"
OUTPUT_NAME = "probabilities"
FORMS = {"onnx": "model.onnx", "torchscript": "model.ts"}


class ParityError(RuntimeError):
    pass


@dataclass
class Parity:
    max_abs_diff: float
    top1_agreement: float
    samples: int

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= MAX_ABS_DIFF and self.top1_agreement == 1.0


def served_module(spec: registry.ModelSpec, model: nn.Module) -> nn.Module:
    """What is exported: the model plus the softmax, so every form answers probabilities."""
    if spec.output_kind == "multiclass":
        return nn.Sequential(model, nn.Softmax(dim=1)).eval()
    return model.eval()  # the binary model already ends in a sigmoid


def export_torchscript(module: nn.Module, path: Path) -> None:
    with warnings.catch_warnings():
        # TorchScript is deprecated in torch 2.13 but is still what TorchServe's stock
        # handlers load; Kiln keeps it as the second backend.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*deprecated.*")
        torch.jit.script(module).save(str(path))


def export_onnx(module: nn.Module, example: torch.Tensor, path: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=65536)
    # The dynamo exporter prints progress and warnings of torch.export internals that say
    # nothing about our models; keep them out of the user's terminal unless it fails.
    chatter = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(chatter):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (example,), str(path),
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},),
            external_data=False,  # one self-contained file for the archive
            verbose=False,
        )
    import onnx

    onnx.checker.check_model(str(path))


def top1(spec: registry.ModelSpec, probs: np.ndarray) -> np.ndarray:
    if spec.output_kind == "binary":
        return (probs[:, 0] >= 0.5).astype(np.int64)
    return probs.argmax(axis=1)


def compare(spec, reference: np.ndarray, candidate: np.ndarray) -> Parity:
    return Parity(
        max_abs_diff=float(np.abs(reference - candidate).max()),
        top1_agreement=float((top1(spec, reference) == top1(spec, candidate)).mean()),
        samples=len(reference),
    )


def run_onnx(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {INPUT_NAME: x})[0]


def run_torchscript(path: Path, x: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.jit.load(str(path), map_location="cpu")
    with torch.inference_mode():
        return module(torch.from_numpy(x)).numpy()


def check_parity(spec, module: nn.Module, paths: dict[str, Path], x: torch.Tensor):
    with torch.inference_mode():
        reference = module(x).numpy()
    x_np = x.numpy()
    results = {}
    for form, runner in (("onnx", run_onnx), ("torchscript", run_torchscript)):
        parity = compare(spec, reference, runner(paths[form], x_np))
        # The batch dimension must really be dynamic: one row alone gives the same answer.
        single = runner(paths[form], x_np[:1])
        if single.shape != reference[:1].shape:
            raise ParityError(f"{form}: a batch of one gives shape {list(single.shape)}, "
                              f"expected {list(reference[:1].shape)}")
        parity.max_abs_diff = max(parity.max_abs_diff,
                                  float(np.abs(single - reference[:1]).max()))
        results[form] = parity
    return results


def signature(spec, meta: dict, parity: dict[str, Parity]) -> dict:
    kind = "image" if spec.dataset == "mnist" else "features"
    n_out = 1 if spec.output_kind == "binary" else len(meta["labels"])
    return {
        "signature_version": 1,
        "name": spec.name,
        "input": {"name": INPUT_NAME, "dtype": "float32", "shape": [-1, *spec.input_shape],
                  "kind": kind},
        "preprocess": meta["preprocess"],
        "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": [-1, n_out],
                   "kind": spec.output_kind, "labels": meta["labels"]},
        "parity": {form: vars(p) for form, p in parity.items()},
        "provenance": {
            "model_class": meta["model_class"],
            "git_sha": git_sha(),
            "trained_git_sha": meta["git_sha"],
            "seed": meta["seed"],
            "data_sha256": meta["data_sha256"],
            "test_accuracy": meta["metrics"]["test_accuracy"],
            "torch_version": torch.__version__,
            "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
        },
    }


def export(name: str, artifacts: Path | None = None) -> dict:
    spec = registry.get(name)
    folder = artifacts or ARTIFACTS / name
    meta = json.loads((folder / "meta.json").read_text())
    model = spec.build()
    model.load_state_dict(torch.load(folder / "state_dict.pt", weights_only=True))
    module = served_module(spec, model)
    splits, _, _ = prepare(spec, data.load(spec.dataset))
    x_test = splits["test"][0]

    # Write beside the final names and move into place only once parity holds, so a
    # failed export never leaves a file that an archive could pick up.
    tmp = {form: folder / f".{fname}.tmp" for form, fname in FORMS.items()}
    try:
        export_torchscript(module, tmp["torchscript"])
        export_onnx(module, x_test[:2], tmp["onnx"])
        parity = check_parity(spec, module, tmp, x_test)
        for form, p in parity.items():
            log.info("%s %-11s max |diff| %.3g  top-1 agreement %.4f on %d test rows",
                     name, form, p.max_abs_diff, p.top1_agreement, p.samples)
        failed = {f: p for f, p in parity.items() if not p.passed}
        if failed:
            raise ParityError("; ".join(
                f"{f}: max |diff| {p.max_abs_diff:.3g} (limit {MAX_ABS_DIFF:g}), "
                f"top-1 agreement {p.top1_agreement:.4f} (need 1.0)" for f, p in failed.items()))
        for form, fname in FORMS.items():
            os.replace(tmp[form], folder / fname)
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)
    sig = signature(spec, meta, parity)
    (folder / "signature.json").write_text(json.dumps(sig, indent=2) + "\n")
    log.info("%s exported -> %s", name, ", ".join(str(folder / f) for f in FORMS.values()))
    return sig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=list(registry.REGISTRY), help="model to export")
    parser.add_argument("--artifacts", type=Path,
                        help="folder with state_dict.pt and meta.json (default: artifacts/NAME)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kiln export", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging()
    return run(args)


def run(args: argparse.Namespace) -> int:
    """The command for parsed arguments (shared by `python -m` and `kiln export`)."""
    try:
        export(args.name, args.artifacts)
    except ParityError as err:
        log.error("%s: parity gate failed, nothing exported: %s", args.name, err)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
