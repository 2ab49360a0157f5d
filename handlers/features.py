"""Features inputs: a JSON object of named values or a list in `names` order, as standardised
model rows. Pure numpy."""

import numpy as np

from kiln.handlers import arrays
from kiln.handlers.errors import BadInput, json_type, quoted


def features_row_from_json(value, spec):
    """One JSON feature row as one model row."""
    return standardise_features(features_from_json(value, spec), spec)


def features_rows_from_raw(values, spec):
    """Raw feature values [N, F] (float64) as model rows, without per-row Python."""
    arrays.check_finite(values, "feature")
    check_feature_bounds(values, spec)
    return standardise_features(values, spec)


def features_from_json(value, spec):
    """A JSON object of named features or a list of numbers, as float64 in `names` order."""
    names = spec["names"]
    if isinstance(value, dict) and list(value) == ["features"]:
        value = value["features"]
    if isinstance(value, dict):
        _check_feature_names(value, names)
        values = [value[name] for name in names]
    elif isinstance(value, list):
        if len(value) != len(names):
            raise BadInput(f"expected {len(names)} features, got {len(value)}", reason="bad_shape")
        values = value
    else:
        raise BadInput(
            f"expected a JSON object of {len(names)} named features or a list of "
            f"{len(names)} numbers, got {json_type(value)}", reason="wrong_type"
        )
    row = np.array(
        [arrays.finite_number(v, f"value for '{name}'")
         for name, v in zip(names, values, strict=False)],
        dtype=np.float64,
    )
    check_feature_bounds(row, spec)
    return row


def _check_feature_names(row, names):
    known = set(names)
    missing = [name for name in names if name not in row]
    unknown = [key for key in row if key not in known]
    problems = []
    if missing:
        problems.append(f"missing {quoted(missing)}")
    if unknown:
        problems.append(f"unknown features: {quoted(unknown)}")
    if missing:
        raise BadInput(f"expected {len(names)} features, got {len(row)}: " + "; ".join(problems),
                       reason="bad_features")
    if unknown:
        raise BadInput(problems[0], reason="bad_features")


def check_feature_bounds(values, spec):
    """Rejects the first value outside its feature's declared min/max, if it has any."""
    low, high = _bounds(spec.get("min")), _bounds(spec.get("max"))
    if low is None and high is None:
        return
    names = spec["names"]
    arrays.check_bounds(values, low, high, lambda at: f"value for '{names[at[-1]]}'")


def _bounds(values):
    """A declared bound list as float64 with NaN (which compares false) for no bound."""
    if values is None or (isinstance(values, list) and all(v is None for v in values)):
        return None
    if not isinstance(values, list):
        return np.float64(values)
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def standardise_features(row, spec):
    """Standardises feature rows ([F] or [N, F]) with the training split's mean and std; a
    value the float32 model input cannot hold, before or after, is refused (it would reach
    the model as infinity and come back as NaN)."""
    check_float32(row, spec, "")
    x = (row - np.asarray(spec["mean"], dtype=np.float64)) / np.asarray(spec["std"], np.float64)
    check_float32(x, spec, " once standardised")
    shape = spec["shape"][1:]
    return x.reshape(shape if row.ndim == 1 else [-1, *shape]).astype(np.float32)


def check_float32(values, spec, when):
    """Rejects the first value outside float32's finite range, naming its feature."""
    at = arrays.first_true(np.abs(values) > arrays.FLOAT32_MAX)
    if at is not None:
        raise BadInput(f"value for '{spec['names'][at[-1]]}' is {values[at]:g}{when}, outside "
                       f"what a float32 model input can hold (±{arrays.FLOAT32_MAX:g})",
                       reason="bad_value")
