"""The Open Inference Protocol (KServe v2) infer body: its input tensor as Kiln's model rows,
and the model's probabilities as its output tensors.

Pure functions over numpy and json: no TorchServe, no torch. The routes around infer (health,
readiness, metadata) are served by Kiln's frontend plugin (deploy/oip_plugin); model_metadata()
here states the same metadata for clients and tests. The contract is docs/signature.md.
"""

import math

import numpy as np

from kiln.handlers import codec
from kiln.handlers.codec import BadInput

REQUEST_FIELDS = ("id", "parameters", "inputs", "outputs")
TENSOR_FIELDS = ("name", "shape", "datatype", "parameters", "data")
# Whole-number datatypes and the range a value must fit; floats take any finite value.
INTEGER_DATATYPES = {name: np.iinfo(getattr(np, name.lower()))
                     for name in ("UINT8", "UINT16", "UINT32", "UINT64",
                                  "INT8", "INT16", "INT32", "INT64")}
FLOAT_DATATYPES = ("FP16", "FP32", "FP64")
# Each row's predicted label, a string tensor beside the probabilities.
LABEL_OUTPUT = "label"
PLATFORM = "kiln"


def decode_infer(body, signature):
    """(rows, encode) for an OIP infer body, or None for any other body.

    rows are float32 model inputs; encode(probabilities) gives the JSON-ready answer.
    """
    value = infer_body(body)
    if value is None:
        return None
    request = parse_infer(value, signature)
    try:
        rows = codec.rows_from_raw(request["values"], signature)
    except BadInput as err:
        raise BadInput(f"input {signature['input']['name']!r}: {err}") from None

    def encode(probabilities):
        return encode_response(probabilities, signature, request["id"], request["outputs"])

    return rows, encode


def infer_body(body):
    """The body as a JSON object if it is an OIP infer request (it has "inputs"), else None.

    TorchServe hands over a parsed object for application/json and bytes or str otherwise;
    only a body that starts like a JSON object is parsed here, so images and .npy arrays are
    left to Kiln's own decoding.
    """
    if isinstance(body, (bytes, bytearray, str)):
        head = body[:64].lstrip()
        if head[:1] not in ("{", b"{"):
            return None
        _, body = codec.sniff_body(body)
    if isinstance(body, dict) and "inputs" in body:
        return body
    return None


def parse_infer(value, signature):
    """Checks an infer request object: {"values": raw float64 array of the input tensor's
    shape (batch first), "id": str or None, "outputs": requested output names or None}."""
    unknown = [key for key in value if key not in REQUEST_FIELDS]
    if unknown:
        raise BadInput(f"unknown field(s) in the infer request: {_names(unknown)}; "
                       f"expected {_names(REQUEST_FIELDS)}")
    request_id = value.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadInput(f'"id" must be a string, got {_describe(request_id)}')
    if not isinstance(value.get("parameters", {}), dict):
        raise BadInput('"parameters" must be an object')
    inputs = value["inputs"]
    name = signature["input"]["name"]
    if not isinstance(inputs, list) or len(inputs) != 1:
        count = len(inputs) if isinstance(inputs, list) else "no array of"
        raise BadInput(f'"inputs" must hold exactly one tensor ({name!r}), got {count} tensors')
    return {"values": tensor_values(inputs[0], signature), "id": request_id,
            "outputs": requested_outputs(value.get("outputs"), signature)}


def tensor_values(tensor, signature):
    """The input tensor's data as float64 of its shape, checked against its datatype."""
    name = signature["input"]["name"]
    if not isinstance(tensor, dict):
        raise BadInput(f"input tensor must be an object, got {_describe(tensor)}")
    unknown = [key for key in tensor if key not in TENSOR_FIELDS]
    missing = [key for key in ("name", "shape", "datatype", "data") if key not in tensor]
    if unknown or missing:
        raise BadInput(f"input tensor has unknown field(s) {_names(unknown)} "
                       f"and lacks {_names(missing)}")
    if tensor["name"] != name:
        raise BadInput(f"unknown input tensor {_describe(tensor['name'])}: "
                       f"this model's input is {name!r}")
    what = f"input {name!r}"
    shape = tensor_shape(tensor["shape"], signature, what)
    datatype = tensor["datatype"]
    if datatype not in INTEGER_DATATYPES and datatype not in FLOAT_DATATYPES:
        raise BadInput(f"{what} has datatype {_describe(datatype)}; expected one of "
                       f"{', '.join(FLOAT_DATATYPES + tuple(INTEGER_DATATYPES))}")
    values = tensor_data(tensor["data"], shape, what)
    if datatype in INTEGER_DATATYPES:
        check_integers(values, INTEGER_DATATYPES[datatype], f"{what} ({datatype})")
    return batch_first(values, signature)


def batch_first(values, signature):
    """[N, H, W] pixels (from [N, 1, H, W] too) or [N, F] features."""
    if signature["input"]["kind"] == "features":
        return values.reshape(len(values), len(signature["preprocess"]["feature_names"]))
    return values.reshape(len(values), *signature["preprocess"]["image_size"])


def tensor_shape(shape, signature, what):
    """The shape as a list, if it is one Kiln takes: [N, H, W], [N, 1, H, W] or [N, F]."""
    if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise BadInput(f"{what} shape must be an array of whole numbers >= 0, "
                       f"got {_describe(shape)}")
    if signature["input"]["kind"] == "features":
        width = len(signature["preprocess"]["feature_names"])
        allowed = [[width]]
    else:
        h, w = signature["preprocess"]["image_size"]
        allowed = [[h, w], [1, h, w]]
    if len(shape) < 2 or shape[1:] not in allowed:
        expected = " or ".join(str(["N", *dims]).replace("'", "") for dims in allowed)
        raise BadInput(f"{what} has shape {shape}, expected {expected}")
    return shape


def tensor_data(data, shape, what):
    """data, flattened (row-major) or nested as shape, as float64 of shape."""
    if not isinstance(data, list):
        raise BadInput(f"{what} data must be an array, got {_describe(data)}")
    size = math.prod(shape)
    if data and isinstance(data[0], list):
        return codec.numbers_array(data, shape, f"{what} value")
    if len(data) != size:
        raise BadInput(f"{what} has {len(data)} values, its shape {shape} needs {size}")
    return codec.numbers_array(data, [size], f"{what} value").reshape(shape)


def check_integers(values, limits, what):
    """Rejects the first value that is not a whole number in the datatype's range."""
    bad = np.argwhere((values != np.floor(values)) | (values < limits.min) |
                      (values > limits.max))
    if len(bad):
        at = [int(i) for i in bad[0]]
        raise BadInput(f"{what} value at {at} is {values[tuple(at)]:g}, not a whole number "
                       f"in [{limits.min}, {limits.max}]")


def requested_outputs(outputs, signature):
    """The output names a request asks for, in its order; None when it asks for all."""
    if outputs is None:
        return None
    known = output_names(signature)
    if not isinstance(outputs, list) or not all(
            isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs):
        raise BadInput('"outputs" must be an array of objects with a "name"')
    unknown = [o["name"] for o in outputs if o["name"] not in known]
    if unknown:
        raise BadInput(f"unknown output(s) {_names(unknown)}: this model has {_names(known)}")
    return [o["name"] for o in outputs]


def output_names(signature):
    return [signature["output"]["name"], LABEL_OUTPUT]


# --- answers ---------------------------------------------------------------------------


def probability_table(probabilities, output):
    """[N, len(labels)] float32: column i is the probability of labels[i] (binary models
    too, whose graph returns only the probability of labels[1]).

    Raises ValueError (the request was fine: the caller answers 500) on a bad model output.
    """
    rows = np.asarray(probabilities, dtype=np.float32).reshape(len(probabilities), -1)
    if not np.all(np.isfinite(rows)):
        raise ValueError(f"model returned a non-finite probability: {rows.tolist()}")
    if output["kind"] == "binary":
        if rows.shape[1] != 1:
            raise ValueError(f"binary model returned {rows.shape[1]} values per row, expected 1")
        rows = np.hstack([1.0 - rows, rows])
    if rows.shape[1] != len(output["labels"]):
        raise ValueError(f"model returned {rows.shape[1]} probabilities for "
                         f"{len(output['labels'])} labels")
    return rows


def predicted_labels(table, output):
    """Each row's label, as codec.encode_answer picks it (binary: labels[1] at >= 0.5;
    multiclass: the first of equal maxima)."""
    if output["kind"] == "binary":
        picks = (table[:, 1] >= 0.5).astype(int)
    else:
        picks = np.argmax(table, axis=1)
    return [output["labels"][i] for i in picks]


def encode_response(probabilities, signature, request_id=None, wanted=None):
    """The OIP inference response for a request's rows of model output."""
    output = signature["output"]
    table = probability_table(probabilities, output)
    tensors = {
        output["name"]: {"name": output["name"], "shape": list(table.shape),
                         "datatype": "FP32", "data": table.ravel().tolist()},
        LABEL_OUTPUT: {"name": LABEL_OUTPUT, "shape": [len(table)], "datatype": "BYTES",
                       "data": predicted_labels(table, output)},
    }
    response = {"model_name": signature["name"]}
    if request_id is not None:
        response["id"] = request_id
    response["outputs"] = [tensors[name] for name in (wanted or output_names(signature))]
    return response


def model_metadata(signature, version):
    """GET /v2/models/NAME as Kiln's frontend plugin answers it: what infer takes (raw pixels
    or raw features, before preprocess) and what it returns."""
    inp, out, pre = signature["input"], signature["output"], signature["preprocess"]
    if inp["kind"] == "image":
        shape = [-1, *pre["image_size"]]
    else:
        shape = [-1, len(pre["feature_names"])]
    return {
        "name": signature["name"],
        "versions": [version],
        "platform": PLATFORM,
        "inputs": [{"name": inp["name"], "datatype": "FP32", "shape": shape}],
        "outputs": [
            {"name": out["name"], "datatype": "FP32", "shape": [-1, len(out["labels"])]},
            {"name": LABEL_OUTPUT, "datatype": "BYTES", "shape": [-1]},
        ],
    }


# --- messages --------------------------------------------------------------------------


def _names(names):
    return ", ".join(f"'{name}'" for name in names) or "nothing"


def _describe(value):
    return codec._describe(value)
