"""Kiln's own request bodies (REST, and gRPC's input map) as model inputs.

A body is an encoded image, JSON, or a .npy array; a model with several inputs takes a
JSON object keyed by input name, or one field per input. The contract is docs/signature.md.
Pure functions over numpy and json: no TorchServe, no torch.
"""

import base64
import binascii
import io
import json
import math
import sys
import tokenize

import numpy as np

from kiln.handlers import arrays, images, inputs, kinds, limits
from kiln.handlers.errors import BadInput, json_type, quoted

NPY_MAGIC = b"\x93NUMPY"


class InputFields(dict):
    """A request whose inputs came one per field, keyed by input name (gRPC's input map,
    a multipart form): name -> the field's bytes or value."""


def request_body(request, signature):
    """The body of one TorchServe request: a raw body arrives as "body", a form field (and
    gRPC's input) as "data"; a model with several inputs may take one field per input."""
    if not isinstance(request, dict):
        return request
    for key in ("data", "body"):
        if key in request:
            return request[key]
    names = [spec["name"] for spec in signature["inputs"]]
    if len(names) > 1 and all(name in request for name in names):
        unknown = [key for key in request if key not in names]
        if unknown:
            raise BadInput(f"unknown fields {quoted(unknown)}: this model's inputs are "
                           f"{quoted(names)}", reason="bad_form")
        return InputFields((name, request[name]) for name in names)
    if request:
        expected = ("the request body or a form field named 'data'" if len(names) == 1 else
                    f"the request body, a form field named 'data' or one field per input "
                    f"({quoted(names)})")
        raise BadInput(f"expected {expected}, got fields: {quoted(list(request))}",
                       reason="bad_form")
    raise BadInput("empty body", reason="empty_body")


def sniff_body(body):
    """Classifies a body as ("encoded", image bytes) or ("json", parsed value).

    TorchServe hands over bytes (images, unparsed JSON), str (text/* content types) or the
    value it already parsed (application/json), so JSON is recognised by content, not by
    content type.
    """
    if isinstance(body, (bytes, bytearray)):
        raw = bytes(body)
        if images.is_encoded_image(raw):
            return "encoded", raw
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise BadInput("not a PNG or JPEG image and not JSON",
                           reason="not_image_or_json") from None
        return "json", parse_json_text(text)
    if isinstance(body, str):
        return "json", parse_json_text(body)
    if body is None:
        raise BadInput("empty body", reason="empty_body")
    return "json", body


def parse_json_text(text):
    """Parses JSON text, once its depth, size and numbers are within limits.py's bounds; NaN
    and Infinity tokens pass here and are rejected with their field."""
    text = text.strip()
    if not text:
        raise BadInput("empty body", reason="empty_body")
    limits.check_json_text(text)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        if text[0] in "[{":
            raise BadInput(
                f"body is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}",
                reason="undecodable"
            ) from None
        raise BadInput("not a PNG or JPEG image and not JSON", reason="not_image_or_json") from None
    except RecursionError:
        raise BadInput("body is not valid JSON: nested too deeply", reason="undecodable") from None
    except ValueError as err:  # Python refuses integers of more than sys.int_info digits
        if "digits" not in str(err):
            raise
        raise BadInput(f"body is not valid JSON: a number has more than "
                       f"{sys.get_int_max_str_digits()} digits", reason="undecodable") from None


def decode_request(body, signature):
    """One single-input request body as one model row (no batch dimension)."""
    kind, value = sniff_body(body)
    return _decode_one(kind, value, signature["inputs"][0])


def decode_body(body, signature, budget=None):
    """One request body as (model inputs, many): a list of arrays, one per input, batch
    first; and whether the client sent several instances (then it gets a list of answers
    back, in order).

    Several instances come as {"instances": [...]}, as a JSON list of instances, or (for a
    single-input model) as one .npy array with a leading batch dimension. What the request
    costs is counted first (limits.py) and charged to `budget`, the server-side batch's,
    before anything is decoded.
    """
    specs = signature["inputs"]
    if isinstance(body, InputFields):
        value = {name: _field_value(raw) for name, raw in body.items()}
        return _decode_instances([_named_parts(value, signature)], False, signature, budget)
    if isinstance(body, (bytes, bytearray)) and bytes(body[:6]) == NPY_MAGIC:
        if len(specs) > 1:
            raise BadInput(f"a .npy body holds one array, and this model takes {len(specs)} "
                           f"inputs ({quoted([s['name'] for s in specs])}): send a JSON "
                           "object keyed by input name", reason="bad_form")
        rows, many = decode_npy(bytes(body), specs[0], budget)
        return [rows], many
    kind, value = sniff_body(body)
    if len(specs) > 1:
        return _decode_several_inputs(kind, value, signature, budget)
    items = _instances(value, specs[0]) if kind == "json" else None
    if items is None:
        return _decode_instances([[(kind, value)]], False, signature, budget)
    _check_items(items)
    return _decode_instances(_each(items, lambda item: [_instance_kind(item)]), True,
                             signature, budget)


def _each(items, part):
    """part(item) for each instance, an error naming the instance's index."""
    out = []
    for i, item in enumerate(items):
        try:
            out.append(part(item))
        except BadInput as err:
            raise BadInput(f"instance {i}: {err}", reason=err.reason) from None
    return out


def _decode_instances(instances, many, signature, budget):
    """Instances (each a list of (kind, value), one per input) as model inputs, once their
    cost is admitted: nothing is decoded before."""
    specs = signature["inputs"]
    limits.admit(request_cost(instances, specs), specs, budget)
    rows = _each(instances, lambda parts: _decode_parts(parts, specs)) if many else [
        _decode_parts(instances[0], specs)]
    return [inputs.stack([row[k] for row in rows], spec) for k, spec in enumerate(specs)], many


def _decode_parts(parts, specs):
    if len(specs) == 1:
        return [_decode_one(*parts[0], specs[0])]
    rows = []
    for (kind, value), spec in zip(parts, specs, strict=True):
        try:
            rows.append(_decode_one(kind, value, spec))
        except BadInput as err:
            raise BadInput(f"input '{spec['name']}': {err}", reason=err.reason) from None
    return rows


def request_cost(instances, specs):
    """What decoding these instances will cost, from counts, headers and leading shapes."""
    raws = [value for parts in instances for kind, value in parts if kind == "encoded"]
    limits.check_images(len(raws))
    pixels = images.check_request_pixels(raws)
    lengths = [1] * len(specs)
    for k, spec in enumerate(specs):
        axis = kinds.of(spec).variable_axis(spec)
        if axis is None:
            continue
        for parts in instances:
            kind, value = parts[k]
            shape = (arrays.leading_shape(kinds.of(spec).unwrapped(value, spec))
                     if kind == "json" else [])
            if len(shape) > axis:
                lengths[k] = max(lengths[k], limits.clamp_length(shape[axis], spec))
    return limits.Cost(len(instances), lengths, len(raws), pixels)


def _check_items(items):
    if not items:
        raise BadInput("no instances to score: the list is empty", reason="bad_shape")
    limits.check_instances(len(items))


def _instances(value, spec):
    """The list of instances in a single-input JSON body, or None for one instance."""
    if isinstance(value, dict) and list(value) == ["instances"]:
        return _instance_list(value)
    if not isinstance(value, list) or not value:
        return None
    return value if kinds.of(spec).is_instance_list(value, spec) else None


def _instance_list(value):
    items = value["instances"]
    if not isinstance(items, list):
        raise BadInput(f'"instances" must be an array, got {json_type(items)}',
                       reason="wrong_type")
    return items


def _instance_kind(item):
    """An instance is JSON, or an encoded image as {"b64": "<base64 PNG/JPEG>"}."""
    if isinstance(item, dict) and list(item) == ["b64"]:
        limits.check_b64(item["b64"])
        try:
            raw = base64.b64decode(item["b64"], validate=True)
        except (TypeError, ValueError, binascii.Error):
            raise BadInput('"b64" is not valid base64', reason="undecodable") from None
        return sniff_body(raw)
    return "json", item


def _decode_one(kind, value, spec):
    value = kinds.of(spec).unwrapped(value, spec)
    if kind == "encoded":
        return inputs.row_from_image(value, spec)
    return inputs.row_from_json(value, spec)


# --- several inputs --------------------------------------------------------------------


def _decode_several_inputs(kind, value, signature, budget):
    names = [spec["name"] for spec in signature["inputs"]]
    if kind == "encoded":
        raise BadInput(f"this model takes {len(names)} inputs ({quoted(names)}): send a JSON "
                       "object keyed by input name, images as {\"b64\": ...}",
                       reason="wrong_type")
    if isinstance(value, dict) and list(value) == ["instances"] and "instances" not in names:
        items = _instance_list(value)
    elif isinstance(value, list):
        items = value
    else:
        return _decode_instances([_named_parts(value, signature)], False, signature, budget)
    _check_items(items)
    return _decode_instances(_each(items, lambda item: _named_parts(item, signature)), True,
                             signature, budget)


def _named_parts(value, signature):
    """One instance of a several-input model, {name: value}, as (kind, value) per input."""
    names = [spec["name"] for spec in signature["inputs"]]
    if not isinstance(value, dict):
        raise BadInput(f"expected a JSON object keyed by input name ({quoted(names)}), got "
                       f"{json_type(value)}", reason="wrong_type")
    missing = [name for name in names if name not in value]
    unknown = [key for key in value if key not in names]
    if missing or unknown:
        problems = ([f"missing {quoted(missing)}"] if missing else []) + (
            [f"unknown inputs: {quoted(unknown)}"] if unknown else [])
        raise BadInput(f"expected the inputs {quoted(names)}: " + "; ".join(problems),
                       reason="bad_form")
    parts = []
    for name in names:
        try:
            parts.append(_input_kind(value[name]))
        except BadInput as err:
            raise BadInput(f"input '{name}': {err}", reason=err.reason) from None
    return parts


def _input_kind(value):
    if isinstance(value, (bytes, bytearray)):
        return sniff_body(value)
    return _instance_kind(value)


def _field_value(raw):
    """A field of gRPC's input map (bytes: an encoded image or JSON text) or of a form."""
    if isinstance(raw, (bytes, bytearray)) and images.is_encoded_image(bytes(raw)):
        return bytes(raw)
    kind, value = sniff_body(raw)
    return value


# --- .npy ------------------------------------------------------------------------------


def decode_npy(raw, spec, budget=None):
    """A .npy body (no pickles) of raw values of one input, one instance or a batch, as
    (rows, many). Its cost is known from the header and admitted before any value is
    converted; the whole array is then checked and preprocessed with vectorised numpy."""
    array = read_npy(raw)
    if array.dtype.kind not in "iuf":
        raise BadInput(f".npy array has dtype {array.dtype}, expected integers or floats",
                       reason="wrong_type")
    many, array = kinds.of(spec).npy_rows(array, spec)  # views: nothing is converted yet
    inputs.check_count(len(array), "the array is empty")
    axis = kinds.of(spec).variable_axis(spec)
    length = 1 if axis is None else limits.clamp_length(array.shape[axis + 1], spec)
    limits.admit(limits.Cost(len(array), [length]), [spec], budget)
    return inputs.rows_from_raw(array.astype(np.float64), spec), many


def read_npy(raw):
    """The array of a .npy body, its header checked against the body's length before any
    memory is taken: a few bytes can declare a terabyte."""
    stream = io.BytesIO(raw)
    try:
        version = np.lib.format.read_magic(stream)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read_header is None:
            raise ValueError(f"format version {version[0]}.{version[1]} is not 1.0 or 2.0")
        shape, fortran, dtype = read_header(stream)
    except (ValueError, OSError, EOFError, SyntaxError, TypeError, tokenize.TokenError) as err:
        # numpy reads the header dict with Python's tokenizer: a cut one is a TokenError.
        raise BadInput(f"not a readable .npy array: {err}", reason="undecodable") from None
    if dtype.hasobject:
        raise BadInput(".npy array holds Python objects (pickles): not accepted",
                       reason="wrong_type")
    count = math.prod(shape)
    data = len(raw) - stream.tell()
    if count * dtype.itemsize != data:
        raise BadInput(f".npy header declares shape {list(shape)} ({count} values), but the "
                       f"body holds {data} bytes of data", reason="undecodable")
    array = np.frombuffer(raw, dtype=dtype, count=count, offset=stream.tell())
    return array.reshape(shape, order="F" if fortran else "C")

