"""signature.json version 2 (docs/signature.md): loaded and checked once, when a model loads,
so that a bad file fails the load with a message naming the key, never a request."""

import json

from kiln.handlers import drift, kinds
from kiln.handlers.arrays import is_int, is_number

SIGNATURE_VERSION = 2
OUTPUT_KINDS = ("multiclass", "binary", "multilabel", "regression", "raw")
DEFAULT_TOP_K = 3
DEFAULT_THRESHOLD = 0.5


def load_signature(path):
    """Reads and checks signature.json; a bad file fails model loading, not every request."""
    with open(path, encoding="utf-8") as f:
        signature = json.load(f)
    check_signature(signature)
    return signature


def check_signature(signature):
    """Raises ValueError naming the first inconsistency in a signature dict."""
    if not isinstance(signature, dict):
        raise ValueError(f"a signature is a JSON object, got {type(signature).__name__}")
    if signature.get("signature_version") != SIGNATURE_VERSION:
        raise ValueError(
            f"signature_version is {signature.get('signature_version')!r}, "
            f"this handler reads version {SIGNATURE_VERSION}: export the model again"
        )
    _require(signature, "name", str, "signature")
    inputs = signature.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise ValueError(f"signature.inputs must be a non-empty list, got {inputs!r}")
    names = [spec.get("name") if isinstance(spec, dict) else None for spec in inputs]
    for i, spec in enumerate(inputs):
        check_input(spec, f"inputs[{i}]")
    if len(set(names)) != len(names):
        raise ValueError(f"signature.inputs has repeated names: {names}")
    check_output(signature.get("output"))
    if "reference" in signature:  # older exports have none: served without drift scores
        drift.check_reference(signature["reference"])


def check_input(spec, where):
    if not isinstance(spec, dict):
        raise ValueError(f"{where} must be an object, got {spec!r}")
    _require(spec, "name", str, where)
    if spec.get("kind") not in kinds.NAMES:
        raise ValueError(f"{where}.kind is {spec.get('kind')!r}, expected one of {kinds.NAMES}")
    shape = spec.get("shape")
    if (not isinstance(shape, list) or len(shape) < 2 or shape[0] != -1
            or not all(is_int(d) and (d >= 1 or d == -1) for d in shape)):
        raise ValueError(f"{where}.shape is {shape!r}: expected [-1, ...] with -1 for the batch "
                         "dimension and whole numbers >= 1 (or -1 for a variable length) after it")
    kinds.of(spec).check(spec, where)


def check_output(output):
    if not isinstance(output, dict):
        raise ValueError(f"signature.output must be an object, got {output!r}")
    _require(output, "name", str, "output")
    kind = output.get("kind")
    if kind not in OUTPUT_KINDS:
        raise ValueError(f"output.kind is {kind!r}, expected one of {OUTPUT_KINDS}")
    shape = output.get("shape")
    if not isinstance(shape, list) or not shape or shape[0] != -1:
        raise ValueError(f"output.shape is {shape!r}, expected [-1, ...]")
    width = shape[-1] if len(shape) == 2 else None
    if kind in ("multiclass", "binary", "multilabel"):
        labels = output.get("labels")
        n_labels = 2 if kind == "binary" else width
        if not isinstance(labels, list) or len(labels) != n_labels:
            raise ValueError(f"output has {len(labels) if isinstance(labels, list) else 'no'} "
                             f"labels, expected {n_labels}")
    if kind == "binary" and width != 1:
        raise ValueError(f"output.shape is {shape}: a binary model returns [-1, 1]")
    if kind == "multiclass":
        top_k = output.get("top_k", DEFAULT_TOP_K)
        if not is_int(top_k) or top_k < 1:
            raise ValueError(f"output.top_k is {top_k!r}, expected a whole number >= 1")
    if kind in ("binary", "multilabel"):
        threshold = output.get("threshold", DEFAULT_THRESHOLD)
        many = isinstance(threshold, list)
        values = threshold if many else [threshold]
        if (kind == "binary" and many) or (many and len(values) != width) or not all(
                is_number(t) and 0 <= t <= 1 for t in values):
            raise ValueError(f"output.threshold is {threshold!r}: expected a number in [0, 1]"
                             + (" or one per label" if kind == "multilabel" else ""))
    if kind == "regression":
        names = output.get("names")
        if not isinstance(names, list) or len(names) != width:
            raise ValueError(f"output.names is {names!r}: expected {width} names, one per column "
                             f"of output.shape {shape}")
        units = output.get("units")
        if units is not None and (not isinstance(units, list) or len(units) != width):
            raise ValueError(f"output.units is {units!r}: expected null or {width} units")


def input_names(signature):
    return [spec["name"] for spec in signature["inputs"]]


def _require(obj, key, kind, where):
    if not isinstance(obj.get(key), kind):
        raise ValueError(f"{where}.{key} is {obj.get(key)!r}, expected a {kind.__name__}")

