"""The input kinds (image, features, tensor): each one object carrying everything that
differs by kind, from what a signature must say about it to how a request, an OIP tensor, a
.npy body, a batch table or an export's random input becomes its model rows. Adding a kind
means a class here and its tests; the rest of Kiln asks `of(spec)`, never spec["kind"].

A model's inputs travel as a list of arrays, one per signature input in forward() order,
each with the batch dimension first.
"""

import math

import numpy as np

from kiln.handlers import arrays, features, images, tensors
from kiln.handlers.arrays import is_int, is_number
from kiln.handlers.errors import BadInput

RESIZE_POLICIES = ("mnist", "fit", "crop", "exact")
TENSOR_DTYPES = ("float16", "float32", "float64", "int8", "int16", "int32", "int64",
                 "uint8", "uint16", "uint32", "uint64")
# What a declaration may give a tensor input (bool too, which no signature takes yet).
DECLARED_DTYPES = ("float32", "float64", "float16", "int64", "int32", "int16", "int8", "uint8",
                   "bool")
# The OIP datatype of each dtype a tensor input may declare.
DATATYPE_OF_DTYPE = {"float16": "FP16", "float32": "FP32", "float64": "FP64",
                     **{name: name.upper() for name in TENSOR_DTYPES if name[0] in "iu"}}


class InputKind:
    """What image, features and tensor inputs share; each kind overrides what differs."""

    name = ""
    # Whether a request may carry it as an encoded image (a body, a field, {"b64": ...}).
    takes_encoded_images = False
    # Whether a batch table's row holds its raw values (else one JSON cell per input).
    raw_table_rows = True
    # How the user is told what the input takes, in a batch job's errors.
    described = ""
    # Whether its examples are raw values a load test can send as one OIP tensor (a tensor's
    # may come keyed by name, or be one of several inputs).
    raw_examples = True
    # Whether its raw values are pixels, whole ones of which travel as UINT8.
    pixels = False

    # The keys a declaration's [[inputs]] table of this kind may hold, besides name and kind.
    declared_keys = ()

    def declared(self, spec, trained, where):
        """A declaration's input table (a copy, its keys known) checked, with its defaults;
        ValueError naming the problem. `trained`: Kiln's recipe fills in the rest."""
        raise NotImplementedError

    def check(self, spec, where):
        """Raises ValueError naming what signature.json gets wrong about the input."""
        raise NotImplementedError

    def raw_shape(self, spec):
        """The shape of one raw value, before preprocess (no batch dimension)."""
        raise NotImplementedError

    def graph_shape(self, spec):
        """The graph's shape of a declared input, batch first (-1)."""
        raise NotImplementedError

    def dtype(self, spec):
        """The graph's dtype of a declared input."""
        return "float32"

    def datatype(self, spec):
        """The OIP datatype of its raw values."""
        return "FP32"

    def random_rows(self, spec, rows, rng):
        """Graph rows drawn in the declared range (export's parity gate)."""
        raise NotImplementedError

    def row_from_json(self, value, spec):
        """One JSON value as one model row (no batch dimension)."""
        raise NotImplementedError

    def row_from_image(self, raw, spec):
        raise BadInput(f"input '{spec['name']}' takes an array, not an image",
                       reason="wrong_type")

    def rows_from_raw(self, values, spec):
        """Raw float64 values, batch first, as checked and preprocessed model rows."""
        raise NotImplementedError

    def stack(self, rows, spec):
        return np.stack(rows) if rows else self.empty(spec)

    def join(self, parts, spec):
        """Per-request arrays of the input as one batch."""
        return np.concatenate(parts) if parts else self.empty(spec)

    def empty(self, spec):
        """No rows: [0, *row shape]."""
        return np.zeros((0, *spec["shape"][1:]), dtype=np.float32)

    def variable_axis(self, spec):
        """The axis of a row whose length varies; None when every row has one shape."""
        return None

    def unwrapped(self, value, spec):
        """A request's value of the input as the kind reads it."""
        return value

    def is_instance_list(self, value, spec):
        """Whether a single-input model's non-empty JSON list is a list of instances."""
        return len(arrays.leading_shape(value)) > len(self.raw_shape(spec))

    def npy_rows(self, array, spec):
        """(many, the array with a batch dimension first) of a .npy body, shape checked."""
        raise NotImplementedError

    def oip_shape(self, shape, spec, what):
        """An OIP tensor's shape (whole numbers >= 0), if the input takes it."""
        allowed = self.oip_row_shapes(spec)
        if len(shape) < 2 or shape[1:] not in allowed:
            expected = " or ".join(str(["N", *dims]).replace("'", "") for dims in allowed)
            raise BadInput(f"{what} has shape {shape}, expected {expected}", reason="bad_shape")
        return shape

    def oip_row_shapes(self, spec):
        """The row shapes (batch dimension excluded) an OIP tensor of it may have."""
        return [self.raw_shape(spec)]

    def oip_row_shape(self, shape, spec):
        """One row's raw shape in an accepted OIP tensor of `shape`."""
        return self.raw_shape(spec)

    def raw_from_json(self, value, spec):
        """A batch file's JSON value as raw values (kinds with raw table rows)."""
        raise NotImplementedError

    def statistics(self, spec, rows):
        """(names, float [N, len(names)]): what drift.py compares with the training data, per
        model row; no names where the kind has nothing to compare."""
        return (), None

    def statistician(self, spec):
        """statistics(spec, rows)'s values as a function of the rows alone, for a worker that
        computes them on every batch (a kind may work out its constants once)."""
        return lambda rows: self.statistics(spec, rows)[1]


class ImageKind(InputKind):
    name = "image"
    takes_encoded_images = True
    pixels = True
    described = "an image"
    declared_keys = ("channels", "size", "resize", "pad", "pixel_max", "mean", "std")

    def declared(self, spec, trained, where):
        spec.setdefault("channels", 1)
        spec.setdefault("resize", "fit")
        spec.setdefault("pad", 0)
        spec.setdefault("pixel_max", 255)
        if spec["channels"] not in (1, 3):
            raise ValueError(f"{where}: channels must be 1 or 3, got {spec['channels']!r}")
        if spec["resize"] not in RESIZE_POLICIES:
            raise ValueError(f"{where}: resize {spec['resize']!r} is not one of "
                             f"{', '.join(RESIZE_POLICIES)}")
        if spec["resize"] == "mnist" and spec["channels"] != 1:
            raise ValueError(f"{where}: resize = \"mnist\" frames grey digits: channels = 1")
        size = spec.get("size")
        if not (isinstance(size, list) and len(size) == 2 and all(
                isinstance(d, int) and d > 0 for d in size)):
            raise ValueError(f"{where}: size must be [height, width], got {size!r}")
        _per_channel(spec, "mean", trained, where)
        _per_channel(spec, "std", trained, where)
        return spec

    def check(self, spec, where):
        if spec.get("dtype") != "float32":
            raise ValueError(f"{where}.dtype is {spec.get('dtype')!r}: image inputs are float32")
        channels = spec.get("channels")
        if channels not in (1, 3):
            raise ValueError(f"{where}.channels is {channels!r}, expected 1 or 3")
        size = spec.get("size")
        if not (isinstance(size, list) and len(size) == 2 and all(is_int(d) and d >= 1
                                                                for d in size)):
            raise ValueError(f"{where}.size is {size!r}, expected [height, width]")
        resize = spec.get("resize")
        if resize not in RESIZE_POLICIES:
            raise ValueError(f"{where}.resize is {resize!r}, expected one of {RESIZE_POLICIES}")
        if resize == "mnist" and channels != 1:
            raise ValueError(f"{where}.resize is 'mnist', which frames grey digits: "
                             "channels must be 1")
        pad = spec.get("pad", 0)
        if not is_int(pad) or pad < 0:
            raise ValueError(f"{where}.pad is {pad!r}, expected a whole number >= 0")
        if not is_number(spec.get("pixel_max", 255)) or spec.get("pixel_max", 255) <= 0:
            raise ValueError(f"{where}.pixel_max is {spec.get('pixel_max')!r}, "
                             "expected a number > 0")
        _check_stats(spec, where, channels, "one per channel")
        height, width = size
        expected = channels * (height + 2 * pad) * (width + 2 * pad)
        if math.prod(spec["shape"][1:]) != expected:
            raise ValueError(
                f"{where}.shape {spec['shape']} does not hold {channels} channel(s) of "
                f"{height + 2 * pad}x{width + 2 * pad} (size {size} padded by {pad})")

    def raw_shape(self, spec):
        """Pixels [H, W] (grey) or [H, W, C]."""
        return images.pixel_shape(spec)

    def graph_shape(self, spec):
        pad = spec.get("pad", 0)
        height, width = spec["size"]
        return [-1, spec["channels"], height + 2 * pad, width + 2 * pad]

    def random_rows(self, spec, rows, rng):
        """Uniform pixels, standardised."""
        x = rng.uniform(0, 1, (rows, *self.graph_shape(spec)[1:]))
        mean = np.asarray(spec["mean"]).reshape(-1, 1, 1)
        std = np.asarray(spec["std"]).reshape(-1, 1, 1)
        return ((x - mean) / std).astype(np.float32)

    def row_from_json(self, value, spec):
        return images.image_row_from_json(value, spec)

    def row_from_image(self, raw, spec):
        return images.image_row_from_bytes(raw, spec)

    def rows_from_raw(self, values, spec):
        return images.image_rows_from_raw(values, spec)

    def npy_rows(self, array, spec):
        pixels = images.pixel_shape(spec)
        shown = ", ".join(map(str, pixels))
        if spec["channels"] == 1:
            h, w = pixels
            if array.shape[-2:] != (h, w) or array.ndim not in (2, 3, 4) or (
                    array.ndim == 4 and array.shape[1] != 1):
                raise BadInput(f".npy array has shape {list(array.shape)}, "
                               f"expected [{h}, {w}], [N, {h}, {w}] or [N, 1, {h}, {w}]",
                               reason="bad_shape")
            return array.ndim > 2, array.reshape(-1, h, w)
        if list(array.shape[-3:]) != pixels or array.ndim not in (3, 4):
            raise BadInput(f".npy array has shape {list(array.shape)}, "
                           f"expected [{shown}] or [N, {shown}]", reason="bad_shape")
        return array.ndim == 4, array.reshape(-1, *pixels)

    def oip_row_shapes(self, spec):
        """Grey pixels come as [H, W] or [1, H, W]."""
        shape = self.raw_shape(spec)
        return [shape, [1, *shape]] if spec["channels"] == 1 else [shape]

    def statistics(self, spec, rows):
        """Each image's mean intensity and ink fraction in [0, 1], after framing and padding
        (a grey background or noise raises both; an inverted digit, framed back, neither)."""
        return ("intensity", "ink"), self.statistician(spec)(rows)

    def statistician(self, spec):
        # In the graph's units: no [0, 1] copy of every pixel. The intensity is one dot
        # product of the flat rows with each pixel's weight (its channel's std over the pixel
        # count), the ink one comparison with each pixel's channel threshold; these constants
        # once per worker rather than per batch took lenet's statistics at batch 1 from 18 to
        # 7 us.
        mean, std = np.asarray(spec["mean"]), np.asarray(spec["std"])
        weights = {}  # per (dtype, pixels): float32 rows get float32 weights (BLAS, no copy)
        offset = mean.mean()

        def values_of(rows):
            flat = rows.reshape(len(rows), math.prod(rows.shape[1:]))
            per_channel = flat.shape[1] // len(mean)
            key = (flat.dtype, per_channel)
            if key not in weights:
                # float32 rows get float32 constants: a float64 threshold made the comparison
                # copy every pixel to float64 first (172 -> 82 us for 256 of lenet's rows,
                # with the byte sum below).
                dtype = flat.dtype if flat.dtype == np.float32 else np.float64
                weights[key] = (np.repeat(std / flat.shape[1], per_channel).astype(dtype),
                                np.repeat((images.INK_THRESHOLD - mean) / std,
                                          per_channel).astype(dtype))
            weight, threshold = weights[key]
            values = np.empty((len(rows), 2))
            values[:, 0] = flat @ weight
            values[:, 0] += offset
            # A row's sum of its comparisons as bytes: count_nonzero along an axis took twice
            # as long (65 against 29 us for 256 of lenet's rows).
            values[:, 1] = (flat > threshold).view(np.uint8).sum(axis=1, dtype=np.int32)
            values[:, 1] /= flat.shape[1]
            return values

        return values_of

    def raw_from_json(self, value, spec):
        """Pixels as JSON, a flat list of H*W(*C) values too."""
        shape = images.pixel_shape(spec)
        if isinstance(value, list) and len(value) == math.prod(shape) and not isinstance(
                value[0], list):
            value = np.asarray(value).reshape(shape).tolist()
        return images.pixels_from_json(value, spec)


class FeaturesKind(InputKind):
    name = "features"
    described = "features"
    declared_keys = ("names", "mean", "std", "min", "max", "ranges")

    def declared(self, spec, trained, where):
        names = spec.get("names")
        _check_ranges(spec, where)
        if not trained:
            if not (isinstance(names, list) and names):
                raise ValueError(f"{where}: features need names = [...]")
            # Values go to the model as they come unless the declaration standardises them.
            spec.setdefault("mean", [0.0] * len(names))
            spec.setdefault("std", [1.0] * len(names))
            if not len(spec["mean"]) == len(spec["std"]) == len(names):
                raise ValueError(f"{where}: mean and std need one value per name")
        return spec

    def check(self, spec, where):
        if spec.get("dtype") != "float32":
            raise ValueError(f"{where}.dtype is {spec.get('dtype')!r}: features inputs are "
                             "float32")
        names = spec.get("names")
        if (not isinstance(names, list) or not names
                or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names)):
            raise ValueError(f"{where}.names must be a non-empty list of distinct strings")
        _check_stats(spec, where, len(names), "one per name")
        for key in ("min", "max"):
            _check_bounds_list(spec.get(key), len(names), f"{where}.{key}")
        if math.prod(spec["shape"][1:]) != len(names):
            raise ValueError(f"{where} has {len(names)} names but shape {spec['shape']}")

    def raw_shape(self, spec):
        return [len(spec["names"])]

    def graph_shape(self, spec):
        return [-1, len(spec["names"])]

    def random_rows(self, spec, rows, rng):
        """Standardised from within min/max, else the training distribution's +-3 std."""
        width = len(spec["names"])
        mean, std = np.asarray(spec["mean"]), np.asarray(spec["std"])
        low = np.asarray([v if v is not None else m - 3 * s for v, m, s in
                          zip(spec.get("min") or [None] * width, mean, std, strict=True)])
        high = np.asarray([v if v is not None else m + 3 * s for v, m, s in
                           zip(spec.get("max") or [None] * width, mean, std, strict=True)])
        raw = rng.uniform(low, high, (rows, width))
        return ((raw - mean) / std).astype(np.float32)

    def row_from_json(self, value, spec):
        return features.features_row_from_json(value, spec)

    def row_from_image(self, raw, spec):
        raise BadInput("this model takes features, not an image", reason="wrong_type")

    def rows_from_raw(self, values, spec):
        return features.features_rows_from_raw(values, spec)

    def is_instance_list(self, value, spec):
        """A row is a list of numbers or an object: a list of lists or objects is several."""
        return isinstance(value[0], (list, dict))

    def npy_rows(self, array, spec):
        width = len(spec["names"])
        if array.shape not in ((width,), array.shape[:1] + (width,)) or array.ndim > 2:
            raise BadInput(f".npy array has shape {list(array.shape)}, "
                           f"expected [{width}] or [N, {width}]", reason="bad_shape")
        return array.ndim == 2, array.reshape(-1, width)

    def raw_from_json(self, value, spec):
        return features.features_from_json(value, spec)

    def statistics(self, spec, rows):
        """Each feature as the model gets it (after the signature's standardisation)."""
        return spec["names"], rows


class TensorKind(InputKind):
    name = "tensor"
    raw_table_rows = False
    raw_examples = False
    described = "a tensor"
    declared_keys = ("dtype", "shape", "max_length", "pad_value", "min", "max")

    def declared(self, spec, trained, where):
        spec.setdefault("dtype", "float32")
        if spec["dtype"] not in DECLARED_DTYPES:
            raise ValueError(f"{where}: dtype {spec['dtype']!r} is not one of "
                             f"{', '.join(DECLARED_DTYPES)}")
        shape = spec.get("shape")
        if not (isinstance(shape, list) and shape and all(
                isinstance(d, int) and (d > 0 or d == -1) for d in shape)):
            raise ValueError(f"{where}: shape (without the batch dimension) must be a "
                             f"list of sizes, -1 for a variable length; got {shape!r}")
        if -1 in shape:
            if not isinstance(spec.get("max_length"), int) or spec["max_length"] < 1:
                raise ValueError(f"{where}: a variable length needs max_length")
            spec.setdefault("pad_value", 0)
        return spec

    def check(self, spec, where):
        if spec.get("dtype") not in TENSOR_DTYPES:
            raise ValueError(f"{where}.dtype is {spec.get('dtype')!r}, expected one of "
                             f"{TENSOR_DTYPES}")
        variable = spec["shape"][1:].count(-1)
        if variable > 1:
            raise ValueError(f"{where}.shape {spec['shape']} has {variable} variable "
                             "dimensions; at most one is supported")
        if variable:
            max_length = spec.get("max_length")
            if not is_int(max_length) or max_length < 1:
                raise ValueError(f"{where} has a variable length: max_length must be a whole "
                                 f"number >= 1, got {max_length!r}")
            if not is_number(spec.get("pad_value", 0)):
                raise ValueError(f"{where}.pad_value is {spec.get('pad_value')!r}, "
                                 "not a number")
        for key in ("min", "max"):
            if spec.get(key) is not None and not is_number(spec[key]):
                raise ValueError(f"{where}.{key} is {spec[key]!r}, expected a number or null")

    def raw_shape(self, spec):
        """Its declared shape without the batch dimension (-1 where its length varies)."""
        return list(spec["shape"][1:])

    def graph_shape(self, spec):
        return [-1, *spec["shape"]]

    def dtype(self, spec):
        return spec.get("dtype", "float32")

    def datatype(self, spec):
        return DATATYPE_OF_DTYPE[spec["dtype"]]

    def random_rows(self, spec, rows, rng):
        """Uniform in [min, max] (integers), variable lengths at half their maximum."""
        shape = [max(1, spec.get("max_length", 2) // 2) if d == -1 else d
                 for d in spec["shape"]]
        dtype = np.dtype(spec["dtype"])
        if dtype.kind in "iub":
            low, high = spec.get("min", 0), spec.get("max", 1)
            return rng.integers(low, high, (rows, *shape), endpoint=True).astype(dtype)
        return rng.uniform(spec.get("min", -1.0), spec.get("max", 1.0),
                           (rows, *shape)).astype(dtype)

    def row_from_json(self, value, spec):
        return tensors.tensor_row_from_json(value, spec)

    def rows_from_raw(self, values, spec):
        return tensors.tensor_rows_from_raw(values, spec)

    def stack(self, rows, spec):
        return tensors.stack_rows(rows, spec)

    def join(self, parts, spec):
        """Variable lengths padded to the longest."""
        return tensors.pad_batches(parts, spec)

    def empty(self, spec):
        return tensors.empty_rows(spec)

    def variable_axis(self, spec):
        return tensors.variable_axis(spec)

    def unwrapped(self, value, spec):
        """A tensor may come keyed by its name, as several do."""
        if isinstance(value, dict) and list(value) == [spec["name"]]:
            return value[spec["name"]]
        return value

    def npy_rows(self, array, spec):
        depth = len(spec["shape"]) - 1
        many = array.ndim == depth + 1
        if not many:
            array = array[np.newaxis]
        tensors.check_tensor_shape(list(array.shape[1:]), spec, ".npy array")
        return many, array

    def oip_shape(self, shape, spec, what):
        if len(shape) < 2:
            raise BadInput(f"{what} has shape {shape}, expected [N] + "
                           f"{tensors.expected_shape_text(spec)}", reason="bad_shape")
        tensors.check_tensor_shape(shape[1:], spec, what)
        return shape

    def oip_row_shape(self, shape, spec):
        """A variable length is the tensor's own."""
        return shape[1:]

    def statistics(self, spec, rows):
        """A variable-length tensor's length: up to its last value other than pad_value (a
        joined batch is padded to its longest row)."""
        axis = tensors.variable_axis(spec)
        if axis is None:
            return (), None
        filled = np.moveaxis(rows != spec.get("pad_value", 0), axis + 1, -1)
        filled = filled.reshape(len(rows), math.prod(filled.shape[1:-1]), filled.shape[-1])
        filled = filled.any(axis=1)
        longest = filled.shape[1]
        lengths = np.where(filled.any(axis=1), longest - np.argmax(filled[:, ::-1], axis=1), 0)
        return ("length",), lengths[:, np.newaxis].astype(np.float64)


IMAGE, FEATURES, TENSOR = ImageKind(), FeaturesKind(), TensorKind()
KINDS = {kind.name: kind for kind in (IMAGE, FEATURES, TENSOR)}
NAMES = tuple(KINDS)


def of(spec):
    """The kind of an input (a signature's or a declaration's, already checked)."""
    return KINDS[spec["kind"]]


def _check_stats(spec, where, n, what):
    for key in ("mean", "std"):
        values = spec.get(key)
        if not isinstance(values, list) or len(values) != n or not all(
                is_number(v) for v in values):
            raise ValueError(f"{where}.{key} is {values!r}: expected {n} number(s), {what}")
    if min(spec["std"]) <= 0:
        raise ValueError(f"{where}.std has a value that is not positive")


def _check_bounds_list(values, n, where):
    if values is None or is_number(values):  # none, or one bound for every name
        return
    if not isinstance(values, list) or len(values) != n or not all(
            v is None or is_number(v) for v in values):
        raise ValueError(f"{where} must be null, a number, or {n} numbers (or nulls), one per "
                         "name")


def _per_channel(spec, key, trained, where):
    if key not in spec:
        if not trained:
            spec[key] = [0.0 if key == "mean" else 1.0] * spec["channels"]
        return
    value = spec[key]
    value = [value] if isinstance(value, (int, float)) else value
    if not (isinstance(value, list) and len(value) == spec["channels"]):
        raise ValueError(f"{where}: {key} needs one number per channel")
    if key == "std" and min(value) <= 0:
        raise ValueError(f"{where}: std must be positive")
    spec[key] = [float(v) for v in value]


def _check_ranges(spec, where):
    """ranges = {feature = [low, high], ...}: what each named feature may take (inf for an open
    side); export writes them into the signature as min/max, and the server refuses a value
    outside with a 400 naming the feature."""
    ranges = spec.get("ranges")
    if ranges is None:
        return
    if "min" in spec or "max" in spec:
        raise ValueError(f"{where}: give ranges or min/max, not both")
    if not isinstance(ranges, dict) or not ranges:
        raise ValueError(f"{where}: ranges must be a table of feature = [low, high]")
    for name, bounds in ranges.items():
        if not (isinstance(bounds, list) and len(bounds) == 2 and all(
                isinstance(b, (int, float)) and not isinstance(b, bool) and b == b
                for b in bounds) and bounds[0] <= bounds[1]):
            raise ValueError(f"{where}: ranges.{name} must be [low, high] with low <= "
                             f"high (inf or -inf for an open side), got {bounds!r}")
    names = spec.get("names")
    unknown = [name for name in ranges if isinstance(names, list) and name not in names]
    if unknown:
        raise ValueError(f"{where}: ranges name unknown features {unknown}")
