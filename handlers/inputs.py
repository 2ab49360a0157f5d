"""One place that knows the input kinds: a value of an input (JSON, encoded image, raw
array) as model rows, and per-request rows joined into one batch for the model.

A model's inputs travel as a list of arrays, one per signature input in forward() order,
each with the batch dimension first.
"""

import numpy as np

from kiln.handlers import features, images, limits, tensors
from kiln.handlers.errors import BadInput

MAX_INSTANCES = limits.MAX_INSTANCES  # batch jobs slice their rows by it


def row_from_json(value, spec):
    """One JSON value of the input `spec` as one model row (no batch dimension)."""
    kind = spec["kind"]
    if kind == "image":
        return images.image_row_from_json(value, spec)
    if kind == "features":
        return features.features_row_from_json(value, spec)
    return tensors.tensor_row_from_json(value, spec)


def row_from_image(raw, spec):
    """PNG/JPEG bytes as one model row of the input `spec`, if it is an image input."""
    if spec["kind"] == "image":
        return images.image_row_from_bytes(raw, spec)
    if spec["kind"] == "features":
        raise BadInput("this model takes features, not an image", reason="wrong_type")
    raise BadInput(f"input '{spec['name']}' takes an array, not an image", reason="wrong_type")


def rows_from_raw(values, spec, bounded=True):
    """Raw values with a batch dimension first (float64; pixels [N, H, W(, C)], features
    [N, F], a tensor [N, ...] of its row shape) as model rows, checked and preprocessed with
    vectorised numpy. Used by .npy bodies, OIP tensors and batch jobs alike; `bounded`: at
    most MAX_INSTANCES rows, as in one request (a batch job's parts are not requests)."""
    kind = spec["kind"]
    if kind == "image":
        rows = images.image_rows_from_raw(values, spec)
    elif kind == "features":
        rows = features.features_rows_from_raw(values, spec)
    else:
        rows = tensors.tensor_rows_from_raw(values, spec)
    if bounded or not len(rows):
        check_count(len(rows), "the array is empty")
    return rows


def check_count(n, empty_why):
    if not n:
        raise BadInput(f"no instances to score: {empty_why}", reason="bad_shape")
    limits.check_instances(n)


def stack(rows, spec):
    """Rows of one input (each without the batch dimension) as one batch array."""
    if spec["kind"] == "tensor":
        return tensors.stack_rows(rows, spec)
    return np.stack(rows) if rows else empty(spec)


def join(parts, signature):
    """Per-request model inputs (each a list of arrays, one per input) as one batch: the
    arrays of each input concatenated, variable lengths padded to the longest."""
    joined = []
    for i, spec in enumerate(signature["inputs"]):
        arrays = [part[i] for part in parts]
        if spec["kind"] == "tensor":
            joined.append(tensors.pad_batches(arrays, spec))
        else:
            joined.append(np.concatenate(arrays) if arrays else empty(spec))
    return joined


def empty(spec):
    """No rows of an input: [0, *row shape]."""
    if spec["kind"] == "tensor":
        return tensors.empty_rows(spec)
    return np.zeros((0, *spec["shape"][1:]), dtype=np.float32)


def batch_size(model_inputs):
    return len(model_inputs[0])


def take(model_inputs, start, stop):
    """Rows start:stop of every input."""
    return [x[start:stop] for x in model_inputs]
