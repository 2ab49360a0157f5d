"""signature.json version 2 (docs/signature.md): loaded and checked once, when a model loads,
so that a bad file fails the load with a message naming the key, never a request."""

import json
import math
import numbers

SIGNATURE_VERSION = 2
INPUT_KINDS = ("image", "features", "tensor")
OUTPUT_KINDS = ("multiclass", "binary", "multilabel", "regression", "raw")
RESIZE_POLICIES = ("mnist", "fit", "crop", "exact")
TENSOR_DTYPES = ("float16", "float32", "float64", "int8", "int16", "int32", "int64",
                 "uint8", "uint16", "uint32", "uint64")
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


def check_input(spec, where):
    if not isinstance(spec, dict):
        raise ValueError(f"{where} must be an object, got {spec!r}")
    _require(spec, "name", str, where)
    if spec.get("kind") not in INPUT_KINDS:
        raise ValueError(f"{where}.kind is {spec.get('kind')!r}, expected one of {INPUT_KINDS}")
    shape = spec.get("shape")
    if (not isinstance(shape, list) or len(shape) < 2 or shape[0] != -1
            or not all(_is_int(d) and (d >= 1 or d == -1) for d in shape)):
        raise ValueError(f"{where}.shape is {shape!r}: expected [-1, ...] with -1 for the batch "
                         "dimension and whole numbers >= 1 (or -1 for a variable length) after it")
    {"image": _check_image, "features": _check_features, "tensor": _check_tensor}[
        spec["kind"]](spec, where)


def _check_image(spec, where):
    if spec.get("dtype") != "float32":
        raise ValueError(f"{where}.dtype is {spec.get('dtype')!r}: image inputs are float32")
    channels = spec.get("channels")
    if channels not in (1, 3):
        raise ValueError(f"{where}.channels is {channels!r}, expected 1 or 3")
    size = spec.get("size")
    if not (isinstance(size, list) and len(size) == 2 and all(_is_int(d) and d >= 1
                                                            for d in size)):
        raise ValueError(f"{where}.size is {size!r}, expected [height, width]")
    resize = spec.get("resize")
    if resize not in RESIZE_POLICIES:
        raise ValueError(f"{where}.resize is {resize!r}, expected one of {RESIZE_POLICIES}")
    if resize == "mnist" and channels != 1:
        raise ValueError(f"{where}.resize is 'mnist', which frames grey digits: channels must be 1")
    pad = spec.get("pad", 0)
    if not _is_int(pad) or pad < 0:
        raise ValueError(f"{where}.pad is {pad!r}, expected a whole number >= 0")
    if not _is_number(spec.get("pixel_max", 255)) or spec.get("pixel_max", 255) <= 0:
        raise ValueError(f"{where}.pixel_max is {spec.get('pixel_max')!r}, expected a number > 0")
    _check_stats(spec, where, channels, "one per channel")
    height, width = size
    expected = channels * (height + 2 * pad) * (width + 2 * pad)
    if math.prod(spec["shape"][1:]) != expected:
        raise ValueError(
            f"{where}.shape {spec['shape']} does not hold {channels} channel(s) of "
            f"{height + 2 * pad}x{width + 2 * pad} (size {size} padded by {pad})")


def _check_features(spec, where):
    if spec.get("dtype") != "float32":
        raise ValueError(f"{where}.dtype is {spec.get('dtype')!r}: features inputs are float32")
    names = spec.get("names")
    if (not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names)
            or len(set(names)) != len(names)):
        raise ValueError(f"{where}.names must be a non-empty list of distinct strings")
    _check_stats(spec, where, len(names), "one per name")
    for key in ("min", "max"):
        _check_bounds_list(spec.get(key), len(names), f"{where}.{key}")
    if math.prod(spec["shape"][1:]) != len(names):
        raise ValueError(f"{where} has {len(names)} names but shape {spec['shape']}")


def _check_tensor(spec, where):
    if spec.get("dtype") not in TENSOR_DTYPES:
        raise ValueError(f"{where}.dtype is {spec.get('dtype')!r}, expected one of "
                         f"{TENSOR_DTYPES}")
    variable = spec["shape"][1:].count(-1)
    if variable > 1:
        raise ValueError(f"{where}.shape {spec['shape']} has {variable} variable dimensions; "
                         "at most one is supported")
    if variable:
        max_length = spec.get("max_length")
        if not _is_int(max_length) or max_length < 1:
            raise ValueError(f"{where} has a variable length: max_length must be a whole "
                             f"number >= 1, got {max_length!r}")
        if not _is_number(spec.get("pad_value", 0)):
            raise ValueError(f"{where}.pad_value is {spec.get('pad_value')!r}, not a number")
    for key in ("min", "max"):
        if spec.get(key) is not None and not _is_number(spec[key]):
            raise ValueError(f"{where}.{key} is {spec[key]!r}, expected a number or null")


def _check_stats(spec, where, n, what):
    for key in ("mean", "std"):
        values = spec.get(key)
        if not isinstance(values, list) or len(values) != n or not all(
                _is_number(v) for v in values):
            raise ValueError(f"{where}.{key} is {values!r}: expected {n} number(s), {what}")
    if min(spec["std"]) <= 0:
        raise ValueError(f"{where}.std has a value that is not positive")


def _check_bounds_list(values, n, where):
    if values is None or _is_number(values):  # none, or one bound for every name
        return
    if not isinstance(values, list) or len(values) != n or not all(
            v is None or _is_number(v) for v in values):
        raise ValueError(f"{where} must be null, a number, or {n} numbers (or nulls), one per "
                         "name")


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
        if not _is_int(top_k) or top_k < 1:
            raise ValueError(f"output.top_k is {top_k!r}, expected a whole number >= 1")
    if kind in ("binary", "multilabel"):
        threshold = output.get("threshold", DEFAULT_THRESHOLD)
        many = isinstance(threshold, list)
        values = threshold if many else [threshold]
        if (kind == "binary" and many) or (many and len(values) != width) or not all(
                _is_number(t) and 0 <= t <= 1 for t in values):
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


def raw_shape(spec):
    """The shape of one raw value of an input, before preprocess: pixels [H, W] (grey) or
    [H, W, C], features [F], a tensor its declared shape without the batch dimension
    (-1 where its length varies)."""
    if spec["kind"] == "image":
        return [*spec["size"]] + ([spec["channels"]] if spec["channels"] > 1 else [])
    if spec["kind"] == "features":
        return [len(spec["names"])]
    return list(spec["shape"][1:])


def _require(obj, key, kind, where):
    if not isinstance(obj.get(key), kind):
        raise ValueError(f"{where}.{key} is {obj.get(key)!r}, expected a {kind.__name__}")


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
