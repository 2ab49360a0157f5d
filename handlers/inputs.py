"""A value of an input (JSON, encoded image, raw array) as model rows, and per-request rows
joined into one batch for the model; what differs by input kind is kinds.py's.

A model's inputs travel as a list of arrays, one per signature input in forward() order,
each with the batch dimension first.
"""

from kiln.handlers import kinds, limits
from kiln.handlers.errors import BadInput

MAX_INSTANCES = limits.MAX_INSTANCES  # batch jobs slice their rows by it


def row_from_json(value, spec):
    """One JSON value of the input `spec` as one model row (no batch dimension)."""
    return kinds.of(spec).row_from_json(value, spec)


def row_from_image(raw, spec):
    """PNG/JPEG bytes as one model row of the input `spec`, if it is an image input."""
    return kinds.of(spec).row_from_image(raw, spec)


def rows_from_raw(values, spec, bounded=True):
    """Raw values with a batch dimension first (float64; pixels [N, H, W(, C)], features
    [N, F], a tensor [N, ...] of its row shape) as model rows, checked and preprocessed with
    vectorised numpy. Used by .npy bodies, OIP tensors and batch jobs alike; `bounded`: at
    most MAX_INSTANCES rows, as in one request (a batch job's parts are not requests)."""
    rows = kinds.of(spec).rows_from_raw(values, spec)
    if bounded or not len(rows):
        check_count(len(rows), "the array is empty")
    return rows


def check_count(n, empty_why):
    if not n:
        raise BadInput(f"no instances to score: {empty_why}", reason="bad_shape")
    limits.check_instances(n)


def stack(rows, spec):
    """Rows of one input (each without the batch dimension) as one batch array."""
    return kinds.of(spec).stack(rows, spec)


def join(parts, signature):
    """Per-request model inputs (each a list of arrays, one per input) as one batch: the
    arrays of each input concatenated, variable lengths padded to the longest."""
    return [kinds.of(spec).join([part[i] for part in parts], spec)
            for i, spec in enumerate(signature["inputs"])]


def batch_size(model_inputs):
    return len(model_inputs[0])


def take(model_inputs, start, stop):
    """Rows start:stop of every input."""
    return [x[start:stop] for x in model_inputs]
