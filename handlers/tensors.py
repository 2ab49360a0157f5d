"""Tensor inputs: raw arrays of a declared shape and dtype (token ids, masks, embeddings), with
range checks, and one variable-length dimension padded inside a batch. Pure numpy.

Values pass through float64 on their way in: whole numbers are exact up to 2**53, far above
any vocabulary size.
"""

import numpy as np

from kiln.handlers import arrays
from kiln.handlers.errors import BadInput, json_type


def variable_axis(spec):
    """The axis of one row (batch dimension excluded) whose length varies, or None."""
    dims = spec["shape"][1:]
    return dims.index(-1) if -1 in dims else None


def expected_shape_text(spec):
    dims = ["L" if d == -1 else str(d) for d in spec["shape"][1:]]
    return f"[{', '.join(dims)}]" + (f" with L <= {spec['max_length']}"
                                     if variable_axis(spec) is not None else "")


def check_tensor_shape(shape, spec, what):
    """Rejects a row shape (batch dimension excluded) the input does not take."""
    dims = spec["shape"][1:]
    axis = variable_axis(spec)
    fits = len(shape) == len(dims) and all(d in (-1, s) for d, s in zip(dims, shape, strict=True))
    if fits and axis is not None and not 1 <= shape[axis] <= spec["max_length"]:
        fits = False
    if not fits:
        raise BadInput(f"{what} has shape {list(shape)}, expected {expected_shape_text(spec)}",
                       reason="bad_shape")


def tensor_row_from_json(value, spec):
    """One JSON array of the input's row shape as an array of its dtype."""
    if not isinstance(value, list):
        raise BadInput(f"expected a JSON array shaped {expected_shape_text(spec)}, "
                       f"got {json_type(value)}", reason="wrong_type")
    shape = arrays.leading_shape(value)
    check_tensor_shape(shape, spec, "array")
    return tensor_rows_from_raw(arrays.numbers_array(value, shape, "value")[np.newaxis],
                                spec)[0]


def tensor_rows_from_raw(values, spec):
    """Raw values [N, ...] (float64, row shape checked by the caller) as the input's dtype,
    checked: finite, whole numbers in range for integer dtypes, within min/max."""
    arrays.check_finite(values, "value")
    dtype = np.dtype(spec["dtype"])
    if dtype.kind in "iu":
        arrays.check_whole(values, np.iinfo(dtype), f"{spec['dtype']}")
    elif dtype.kind == "f":  # past its largest value a float16/32 becomes infinity
        largest = float(np.finfo(dtype).max)
        arrays.check_bounds(values, -largest, largest,
                            lambda at: f"value at {list(at)} (a {spec['dtype']} input)")
    if spec.get("min") is not None or spec.get("max") is not None:
        arrays.check_bounds(values, spec.get("min"), spec.get("max"),
                            lambda at: f"value at {list(at)}")
    return values.astype(dtype)


def stack_rows(rows, spec):
    """Rows of one tensor input as one batch array: a variable-length axis is padded with
    pad_value up to the longest row."""
    axis = variable_axis(spec)
    if axis is None or not rows:
        return np.stack(rows) if rows else empty_rows(spec)
    return pad_batches([row[np.newaxis] for row in rows], spec)


def pad_batches(parts, spec):
    """Batch arrays [n_i, ...] of one input as one [sum n_i, ...] array, padding a
    variable-length axis to the longest with pad_value."""
    axis = variable_axis(spec)
    if axis is None:
        return np.concatenate(parts)
    longest = max(part.shape[axis + 1] for part in parts)
    padded = []
    for part in parts:
        missing = longest - part.shape[axis + 1]
        if missing:
            widths = [(0, 0)] * part.ndim
            widths[axis + 1] = (0, missing)
            part = np.pad(part, widths, constant_values=spec.get("pad_value", 0))
        padded.append(part)
    return np.concatenate(padded)


def empty_rows(spec):
    dims = [1 if d == -1 else d for d in spec["shape"][1:]]
    return np.zeros((0, *dims), dtype=np.dtype(spec["dtype"]))
