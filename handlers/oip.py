"""The Open Inference Protocol (KServe v2) infer body: its input tensors as Kiln's model
inputs, and the model's output as its output tensors.

Pure functions over numpy and json: no TorchServe, no torch. The routes around infer (health,
readiness, metadata) are served by Kiln's frontend plugin (deploy/oip_plugin), which also
marks the requests it forwards (PROTOCOL_HEADER), so that the handler decodes them here and
nowhere else. The metadata's tensors are built here (tensor_metadata), written into the
archive and served from there by the plugin. The contract is docs/signature.md.
"""

import math

import numpy as np

from kiln.handlers import answers, arrays, inputs, kinds, limits, rest
from kiln.handlers.errors import BadInput, describe

# Set by the OIP plugin on every request it forwards to a worker.
PROTOCOL_HEADER = "kiln-protocol"
PROTOCOL = "oip"
# Set by the plugin on a request with binary inputs (the binary tensor data extension), which
# it forwards as it came: the length of the JSON header that the tensors' bytes follow, in
# input order, each `binary_data_size` bytes. The plugin has checked that framing.
BINARY_HEADER = "kiln-binary-header-length"
BINARY_SIZE = "binary_data_size"
# The little-endian numpy dtype of each binary datatype the handler may take.
BINARY_DTYPES = {"BOOL": "|b1", "INT8": "|i1", "UINT8": "|u1", "INT16": "<i2", "UINT16": "<u2",
                 "INT32": "<i4", "UINT32": "<u4", "INT64": "<i8", "UINT64": "<u8",
                 "FP16": "<f2", "FP32": "<f4", "FP64": "<f8"}
# Fields that name what a request is for, which KServe's SDK puts in every infer body (Triton's
# protocol lists them too): taken when they say what the request reached, refused otherwise.
ROUTE_FIELDS = ("model_name", "model_version")
REQUEST_FIELDS = ("id", "parameters", "inputs", "outputs", *ROUTE_FIELDS)
TENSOR_FIELDS = ("name", "shape", "datatype", "parameters", "data")
# Whole-number datatypes and the range a value must fit; floats take any finite value.
INTEGER_DATATYPES = {name: np.iinfo(getattr(np, name.lower()))
                     for name in ("UINT8", "UINT16", "UINT32", "UINT64",
                                  "INT8", "INT16", "INT32", "INT64")}
FLOAT_DATATYPES = ("FP16", "FP32", "FP64")
# Each row's predicted label, a string tensor beside the probabilities.
LABEL_OUTPUT = "label"
PLATFORM = "kiln"
# In every archive (beside signature.json): tensor_metadata(), which the plugin serves.
METADATA_FILE = "oip-metadata.json"


def decode_infer(body, signature, budget=None, json_length=None, version=None, reached=None):
    """(model inputs, encode) for an OIP infer body: one array per signature input, batch
    first; encode(model output) gives the JSON-ready response. Its cost, from the tensors'
    shapes, is admitted (limits.py; `budget`: the server-side batch's) before data is read.
    `json_length`: the plugin's BINARY_HEADER, for a body with binary inputs; `version`: the
    served version, the answer's model_version; `reached`: {field of ROUTE_FIELDS: what the
    request reached, None where not checked}, by default the signature's name and `version`."""
    value = infer_body(body) if json_length is None else binary_body(body, json_length)
    limits.admit(limits.infer_cost(value, signature["inputs"]), signature["inputs"], budget)
    check_route(value, reached or {"model_name": signature["name"], "model_version": version})
    request = parse_infer(value, signature)
    model_inputs = []
    for spec in signature["inputs"]:
        try:
            model_inputs.append(inputs.rows_from_raw(request["values"][spec["name"]], spec))
        except BadInput as err:
            raise BadInput(f"input {spec['name']!r}: {err}", reason=err.reason) from None

    def encode(model_output):
        return encode_response(model_output, signature, request["id"], request["outputs"],
                               version)

    return model_inputs, encode


def infer_body(body):
    """The body as a JSON object with "inputs", or BadInput. TorchServe hands over a parsed
    object for application/json and bytes or str otherwise."""
    if isinstance(body, (bytes, bytearray, str)):
        _, body = rest.sniff_body(body)
    if not isinstance(body, dict) or "inputs" not in body:
        raise BadInput('an infer request is a JSON object with "inputs"', reason="bad_form")
    return body


def binary_body(body, json_length):
    """The request object of a body with binary inputs, each such input's "data" a numpy view
    of its bytes in the body (nothing copied)."""
    if not isinstance(body, (bytes, bytearray)) or not str(json_length).isdigit() or int(
            json_length) > len(body):
        raise BadInput("binary tensor data without its framing", reason="bad_form")
    offset = int(json_length)
    value = infer_body(bytes(memoryview(body)[:offset]))
    tensors_in = value["inputs"] if isinstance(value["inputs"], list) else []
    for tensor in tensors_in:
        parameters = tensor.get("parameters") if isinstance(tensor, dict) else None
        if not isinstance(parameters, dict) or BINARY_SIZE not in parameters:
            continue
        size, dtype = parameters[BINARY_SIZE], BINARY_DTYPES.get(tensor.get("datatype"))
        if dtype is None:  # BYTES, whose datatype tensor_values refuses with its name
            tensor["data"] = []
        elif type(size) is not int or offset + size > len(body) or size % np.dtype(dtype).itemsize:
            raise BadInput("binary tensor data without its framing", reason="bad_form")
        else:
            tensor["data"] = np.frombuffer(body, dtype, size // np.dtype(dtype).itemsize, offset)
        offset += size
    return value


def parse_infer(value, signature):
    """Checks an infer request object: {"values": {input name: raw float64 array, batch
    first}, "id": str or None, "outputs": requested output names or None}."""
    unknown = [key for key in value if key not in REQUEST_FIELDS]
    if unknown:
        raise BadInput(f"unknown field(s) in the infer request: {_names(unknown)}; "
                       f"expected {_names(REQUEST_FIELDS)}", reason="bad_form")
    request_id = value.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadInput(f'"id" must be a string, got {describe(request_id)}', reason="bad_form")
    if not isinstance(value.get("parameters", {}), dict):
        raise BadInput('"parameters" must be an object', reason="bad_form")
    tensors_in = value["inputs"]
    specs = signature["inputs"]
    if not isinstance(tensors_in, list) or len(tensors_in) != len(specs):
        count = len(tensors_in) if isinstance(tensors_in, list) else "no array of"
        if len(specs) == 1:
            wanted = f"exactly one tensor ({specs[0]['name']!r})"
        else:
            wanted = f"one tensor per input ({_names([s['name'] for s in specs])})"
        raise BadInput(f'"inputs" must hold {wanted}, got {count} tensors', reason="bad_form")
    values = {}
    for tensor in tensors_in:
        spec = _spec_of(tensor, signature)
        if spec["name"] in values:
            raise BadInput(f"input tensor {spec['name']!r} is given twice", reason="bad_form")
        values[spec["name"]] = tensor_values(tensor, spec)
    sizes = {name: len(v) for name, v in values.items()}
    if len(set(sizes.values())) > 1:
        raise BadInput(f"input tensors have different batch sizes: {sizes}", reason="bad_shape")
    return {"values": values, "id": request_id,
            "outputs": requested_outputs(value.get("outputs"), signature)}


def check_route(value, reached):
    """BadInput, naming both, when the body's model_name or model_version is not what the
    request reached: its route's model, and the version that answers it (on an unversioned
    route, the one the route picked: a body that pins another version would otherwise get an
    answer from a version it did not ask for). An empty model_version asks for none, as in
    the protocol's gRPC form, where "" is the unset value."""
    name, version = reached["model_name"], reached.get("model_version")
    given = _route_field(value, "model_name")
    if given is not None and given != name:
        raise BadInput(f'"model_name" in the infer request is {describe(given)}, but it '
                       f"reached model {describe(name)}", reason="bad_form")
    given = _route_field(value, "model_version")
    if given and version is not None and given != version:
        raise BadInput(f'"model_version" in the infer request is {describe(given)}, but '
                       f"version {describe(version)} of {describe(name)} answers it; pin a "
                       f"version in the path: /v2/models/NAME/versions/VERSION/infer",
                       reason="bad_form")


def _route_field(value, field):
    """The body's `field` of ROUTE_FIELDS, a string, or None when it has none."""
    given = value.get(field)
    if given is not None and not isinstance(given, str):
        raise BadInput(f'"{field}" must be a string, got {describe(given)}', reason="bad_form")
    return given


def _spec_of(tensor, signature):
    """The signature input a tensor names, after checking the tensor's fields."""
    if not isinstance(tensor, dict):
        raise BadInput(f"input tensor must be an object, got {describe(tensor)}",
                       reason="bad_form")
    unknown = [key for key in tensor if key not in TENSOR_FIELDS]
    missing = [key for key in ("name", "shape", "datatype", "data") if key not in tensor]
    if unknown or missing:
        raise BadInput(f"input tensor has unknown field(s) {_names(unknown)} "
                       f"and lacks {_names(missing)}", reason="bad_form")
    specs = signature["inputs"]
    for spec in specs:
        if tensor["name"] == spec["name"]:
            return spec
    if len(specs) == 1:
        known = f"this model's input is {specs[0]['name']!r}"
    else:
        known = f"this model's inputs are {_names([s['name'] for s in specs])}"
    raise BadInput(f"unknown input tensor {describe(tensor['name'])}: {known}",
                   reason="bad_form")


def tensor_values(tensor, spec):
    """An input tensor's data as raw float64 values, batch first, checked against its
    datatype and the input's shape."""
    what = f"input {spec['name']!r}"
    shape = tensor_shape(tensor["shape"], spec, what)
    datatype = tensor["datatype"]
    if datatype not in INTEGER_DATATYPES and datatype not in FLOAT_DATATYPES:
        raise BadInput(f"{what} has datatype {describe(datatype)}; expected one of "
                       f"{', '.join(FLOAT_DATATYPES + tuple(INTEGER_DATATYPES))}",
                       reason="wrong_type")
    values = tensor_data(tensor["data"], shape, what)
    if datatype in INTEGER_DATATYPES:
        arrays.check_whole(values, INTEGER_DATATYPES[datatype], f"{what} ({datatype})")
    return values.reshape(len(values), *kinds.of(spec).oip_row_shape(shape, spec))


def tensor_shape(shape, spec, what):
    """The shape as a list, if it is one Kiln takes: [N, *raw shape] ([N, 1, H, W] too)."""
    if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise BadInput(f"{what} shape must be an array of whole numbers >= 0, "
                       f"got {describe(shape)}", reason="bad_shape")
    return kinds.of(spec).oip_shape(shape, spec, what)


def tensor_data(data, shape, what):
    """data, flattened (row-major) or nested as shape, as float64 of shape."""
    if isinstance(data, np.ndarray):
        return binary_values(data, shape, what)
    if not isinstance(data, list):
        raise BadInput(f"{what} data must be an array, got {describe(data)}",
                       reason="wrong_type")
    size = math.prod(shape)
    if data and isinstance(data[0], list):
        check_nesting(data, shape, what)
        return arrays.numbers_array(data, shape, f"{what} value")
    if len(data) != size:
        raise BadInput(f"{what} has {len(data)} values, its shape {shape} needs {size}",
                       reason="bad_shape")
    return arrays.numbers_array(data, [size], f"{what} value").reshape(shape)


def check_nesting(data, shape, what):
    """Nested data must be nested as the tensor's shape: [28 rows] for [1, 28, 28] says it
    left out a dimension, which 'ragged' would not tell the client."""
    nested = arrays.leading_shape(data)
    if nested != shape:
        raise BadInput(f"{what} data must be flat or nested as its shape {shape}, "
                       f"got an array nested as {nested}", reason="bad_shape")


def binary_values(data, shape, what):
    """A binary tensor's flat values as float64 of shape, refused as their JSON form is."""
    size = math.prod(shape)
    if data.size != size:
        raise BadInput(f"{what} has {data.size} values, its shape {shape} needs {size}",
                       reason="bad_shape")
    values = data.astype(np.float64)
    bad = arrays.first_true(~np.isfinite(values))
    if bad is not None:
        raise BadInput(f"{what} value at {list(bad)} is not a finite number: "
                       f"{describe(float(values[bad]))}", reason="bad_value")
    return values.reshape(shape)


def requested_outputs(outputs, signature):
    """The output names a request asks for, in its order; None when it asks for all."""
    if outputs is None:
        return None
    known = output_names(signature)
    if not isinstance(outputs, list) or not all(
            isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs):
        raise BadInput('"outputs" must be an array of objects with a "name"', reason="bad_form")
    unknown = [o["name"] for o in outputs if o["name"] not in known]
    if unknown:
        raise BadInput(f"unknown output(s) {_names(unknown)}: this model has {_names(known)}",
                       reason="bad_form")
    return [o["name"] for o in outputs]


def output_names(signature):
    output = signature["output"]
    if output["kind"] in ("regression", "raw"):
        return [output["name"]]
    return [output["name"], LABEL_OUTPUT]


# --- answers ---------------------------------------------------------------------------


def output_tensors(model_output, output):
    """{name: tensor} of a request's rows of model output, by output kind."""
    if output["kind"] in ("regression", "raw"):
        rows = answers.output_rows(model_output, output)
        return {output["name"]: _tensor(output["name"], rows, "FP32")}
    table = answers.probability_table(model_output, output)
    return {
        output["name"]: _tensor(output["name"], table, "FP32"),
        LABEL_OUTPUT: {"name": LABEL_OUTPUT, "shape": [len(table)], "datatype": "BYTES",
                       "data": answers.predicted_labels(model_output, output)},
    }


def _tensor(name, values, datatype):
    return {"name": name, "shape": list(values.shape), "datatype": datatype,
            "data": values.ravel().tolist()}


def encode_response(model_output, signature, request_id=None, wanted=None, version=None):
    """The OIP inference response for a request's rows of model output."""
    tensors_out = output_tensors(model_output, signature["output"])
    response = {"model_name": signature["name"]}
    if version is not None:
        response["model_version"] = version
    if request_id is not None:
        response["id"] = request_id
    response["outputs"] = [tensors_out[name] for name in (wanted or output_names(signature))]
    return response


def model_metadata(signature, version):
    """GET /v2/models/NAME as Kiln's frontend plugin answers it: the served model's name and
    version, then the archive's METADATA_FILE."""
    return {"name": signature["name"], "versions": [version], **tensor_metadata(signature)}


def tensor_metadata(signature):
    """What infer takes (raw values, before preprocess) and what it returns. The archive
    carries it as METADATA_FILE, built here once: the plugin serves that file, it does not
    build the tensors again in Java."""
    out = signature["output"]
    if out["kind"] in ("regression", "raw"):
        shape = out["shape"] if out["kind"] == "raw" else [-1, len(out["names"])]
        outputs = [{"name": out["name"], "datatype": "FP32", "shape": shape}]
    else:
        outputs = [{"name": out["name"], "datatype": "FP32", "shape": [-1, len(out["labels"])]},
                   {"name": LABEL_OUTPUT, "datatype": "BYTES", "shape": [-1]}]
    return {
        "platform": PLATFORM,
        "inputs": [{"name": spec["name"], "datatype": kinds.of(spec).datatype(spec),
                    "shape": [-1, *kinds.of(spec).raw_shape(spec)]}
                   for spec in signature["inputs"]],
        "outputs": outputs,
    }


def _names(names):
    return ", ".join(f"'{name}'" for name in names) or "nothing"
