"""Nested JSON lists as checked numpy arrays: shape, finite numbers, whole numbers, ranges."""

import itertools
import math
import numbers

import numpy as np

from kiln.handlers.errors import BadInput, describe, json_type


def leading_shape(value):
    """The shape a nested list claims along its first items: [[1, 2], [3]] -> [2, 2]."""
    shape = []
    while isinstance(value, list):
        shape.append(len(value))
        if not value:
            break
        value = value[0]
    return shape


def numbers_array(value, shape, what):
    """Checks a nested list has exactly `shape` and finite numbers; returns float64 values."""
    fast = _numeric_array(value, shape)
    if fast is not None:
        return fast
    # Something is wrong (or unusual) with this array: walk it to name the first problem.
    flat = []

    def walk(node, index):
        if len(index) == len(shape):
            if isinstance(node, list):
                raise BadInput(f"{what} array is ragged at {index}", reason="bad_shape")
            flat.append(finite_number(node, f"{what} at {index}"))
            return
        if not isinstance(node, list) or len(node) != shape[len(index)]:
            raise BadInput(f"{what} array is ragged at {index}", reason="bad_shape")
        for i, item in enumerate(node):
            walk(item, index + [i])

    walk(value, [])
    return np.array(flat, dtype=np.float64).reshape(shape)


def _numeric_array(value, shape):
    """The array numpy builds from a well-formed nested list of finite numbers, or None.

    numpy converts a 28x28 list some 40x faster than a walk in Python; the walk stays for
    arrays that need a precise error. Booleans, which numpy would quietly make 0 and 1,
    send the array to the walk.
    """
    try:
        array = np.asarray(value)
    except ValueError:  # ragged
        return None
    if list(array.shape) != list(shape) or array.dtype.kind not in "iuf":
        return None
    leaves = value
    for _ in range(len(shape) - 1):
        leaves = itertools.chain.from_iterable(leaves)
    if any(type(v) is bool for v in leaves):
        return None
    array = array.astype(np.float64)
    return array if np.isfinite(array).all() else None


# The largest value a float32 model input holds; past it a value becomes infinity.
FLOAT32_MAX = float(np.finfo(np.float32).max)


def finite_number(value, what):
    """value as a float, or BadInput: booleans, strings and NaN/Infinity are not numbers."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadInput(f"{what} is {json_type(value)}, not a number: {describe(value)}",
                       reason="bad_value")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise BadInput(f"{what} is not a finite number: {describe(value)}", reason="bad_value")
    return number


def first_true(mask):
    """The index of a boolean array's first True, as a tuple of ints; None where there is
    none (checked with any(): a tenth of what np.argwhere costs over a clean array)."""
    if not mask.any():
        return None
    return tuple(int(i) for i in np.argwhere(mask)[0])


def check_finite(values, what):
    """Rejects the first value of a float64 array that is NaN or infinite."""
    bad = first_true(~np.isfinite(values))
    if bad is not None:
        at = list(bad)
        raise BadInput(f"{what} at {at} is not a finite number: {values[tuple(at)]}",
                       reason="bad_value")


def check_whole(values, limits, what):
    """Rejects the first value that is not a whole number in [limits.min, limits.max]."""
    bad = first_true((values != np.floor(values)) | (values < limits.min) |
                     (values > limits.max))
    if bad is not None:
        at = list(bad)
        raise BadInput(f"{what} value at {at} is {values[tuple(at)]:g}, not a whole number "
                       f"in [{limits.min}, {limits.max}]", reason="bad_value")


def check_bounds(values, low, high, what):
    """Rejects the first value below `low` or above `high` (either may be None, or an array
    broadcast against the values' last axis with NaN for no bound)."""
    below = values < low if low is not None else np.zeros(values.shape, bool)
    above = values > high if high is not None else np.zeros(values.shape, bool)
    at = first_true(below | above)
    if at is not None:
        side, bound = ("below its minimum", low) if below[at] else ("above its maximum", high)
        bound = np.broadcast_to(bound, values.shape)[at]
        raise BadInput(f"{what(at)} is {values[at]:g}, {side} {bound:g}", reason="bad_value")


def is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
