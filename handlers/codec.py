"""Decode Kiln requests into model inputs and encode model outputs into answers.

Pure functions over numpy, PIL and json: no TorchServe, no torch. The contract they
implement is docs/signature.md.
"""

import base64
import binascii
import functools
import io
import itertools
import json
import logging
import math

import numpy as np
from PIL import ExifTags, Image, ImageOps

logger = logging.getLogger(__name__)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
NPY_MAGIC = b"\x93NUMPY"
# One request may carry several inputs; past this many, a client should send a batch job.
MAX_INSTANCES = 512
# Checked from the header, before any pixel is decoded: a 30 kB PNG can declare a
# gigapixel image, and decoding it would take the worker's memory.
MAX_IMAGE_PIXELS = 4096 * 4096
# After inversion, a pixel brighter than this is ink when framing a digit.
INK_THRESHOLD = 0.1
# MNIST scales each digit's longer side to 20 pixels inside its 28x28 canvas.
FRAME_SIDE = 20
# Lanczos keeps thin strokes sharp when a photo is scaled down by a large factor.
RESAMPLE = Image.Resampling.LANCZOS
MAX_LISTED_NAMES = 5
# Each 8-bit grey level in [0, 1], exactly as level / 255.0 gives it: a lookup is cheaper.
_UNIT_LEVELS = np.arange(256, dtype=np.float64) / 255.0
_UNIT_LEVELS.flags.writeable = False

SIGNATURE_VERSION = 1
INPUT_KINDS = ("image", "features")
OUTPUT_KINDS = ("multiclass", "binary")


# Why a request is rejected, as a fixed set: metrics are labelled by it, and the message
# (which quotes the request) would make a new label value for every bad request.
REJECT_REASONS = ("empty_body", "bad_form", "not_image_or_json", "undecodable", "too_large",
                  "wrong_type", "bad_shape", "bad_features", "bad_value", "other")


class BadInput(ValueError):
    """A request that cannot be scored; str(error) is the message the client sees, `reason`
    one of REJECT_REASONS."""

    def __init__(self, message, reason="other"):
        super().__init__(message)
        self.reason = reason


# --- signature -------------------------------------------------------------------------


def load_signature(path):
    """Reads and checks signature.json; a bad file fails model loading, not every request."""
    with open(path, encoding="utf-8") as f:
        signature = json.load(f)
    check_signature(signature)
    return signature


def check_signature(signature):
    """Raises ValueError naming the first inconsistency in a signature dict."""
    if signature.get("signature_version") != SIGNATURE_VERSION:
        raise ValueError(
            f"signature_version is {signature.get('signature_version')!r}, "
            f"this handler reads version {SIGNATURE_VERSION}"
        )
    inp, out, pre = signature["input"], signature["output"], signature["preprocess"]
    if inp["kind"] not in INPUT_KINDS:
        raise ValueError(f"input.kind is {inp['kind']!r}, expected one of {INPUT_KINDS}")
    if out["kind"] not in OUTPUT_KINDS:
        raise ValueError(f"output.kind is {out['kind']!r}, expected one of {OUTPUT_KINDS}")
    n_labels = 2 if out["kind"] == "binary" else out["shape"][-1]
    if len(out["labels"]) != n_labels:
        raise ValueError(f"output has {len(out['labels'])} labels, expected {n_labels}")
    row_size = math.prod(inp["shape"][1:])
    if inp["kind"] == "image":
        height, width = pre["image_size"]
        padded = (height + 2 * pre["pad"]) * (width + 2 * pre["pad"])
        if padded != row_size or pre["pixel_max"] <= 0 or pre["std"] <= 0:
            raise ValueError(
                f"preprocess {pre} does not fit input.shape {inp['shape']} "
                "(or pixel_max/std is not positive)"
            )
    else:
        n = len(pre["feature_names"])
        if not n == len(pre["mean"]) == len(pre["std"]) == row_size:
            raise ValueError(
                f"{n} feature_names, {len(pre['mean'])} means, {len(pre['std'])} stds "
                f"and input.shape {inp['shape']} disagree"
            )
        if min(pre["std"]) <= 0:
            raise ValueError("preprocess.std has a value that is not positive")


# --- request body ----------------------------------------------------------------------


def request_body(request):
    """The body of one TorchServe request: a raw body arrives as "body", a form field as "data"."""
    if not isinstance(request, dict):
        return request
    for key in ("data", "body"):
        if key in request:
            return request[key]
    if request:
        raise BadInput(
            f"expected the request body or a form field named 'data', got fields: "
            f"{_quoted(list(request))}", reason="bad_form"
        )
    raise BadInput("empty body", reason="empty_body")


def sniff_body(body):
    """Classifies a body as ("image", bytes) or ("json", parsed value).

    TorchServe hands over bytes (images, unparsed JSON), str (text/* content types) or the
    value it already parsed (application/json), so JSON is recognised by content, not by
    content type.
    """
    if isinstance(body, (bytes, bytearray)):
        raw = bytes(body)
        if raw.startswith(PNG_MAGIC) or raw.startswith(JPEG_MAGIC):
            return "image", raw
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
    """Parses JSON text; NaN and Infinity tokens pass here and are rejected with their field."""
    text = text.strip()
    if not text:
        raise BadInput("empty body", reason="empty_body")
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


def decode_request(body, signature):
    """Turns one single-input request body into a float32 array of input.shape[1:]."""
    kind, value = sniff_body(body)
    return _decode_one(kind, value, signature)


def decode_instances(body, signature):
    """One request body as (rows, many): float32 [n, *input.shape[1:]], and whether the
    client sent several inputs (then it gets a list of answers back, in order).

    Several inputs come as {"instances": [...]}, as a JSON list of feature rows or of pixel
    arrays, or as one .npy array with a leading batch dimension.
    """
    if isinstance(body, (bytes, bytearray)) and bytes(body[:6]) == NPY_MAGIC:
        return decode_npy(bytes(body), signature)
    kind, value = sniff_body(body)
    items = _instances(value, signature) if kind == "json" else None
    if items is None:
        return _decode_one(kind, value, signature)[np.newaxis], False
    if not items:
        raise BadInput("no instances to score: the list is empty", reason="bad_shape")
    if len(items) > MAX_INSTANCES:
        raise BadInput(f"{len(items)} instances in one request, more than {MAX_INSTANCES}",
                       reason="too_large")
    rows = []
    for i, item in enumerate(items):
        try:
            rows.append(_decode_one(*_instance_kind(item), signature))
        except BadInput as err:
            raise BadInput(f"instance {i}: {err}", reason=err.reason) from None
    return np.stack(rows), True


def _instances(value, signature):
    """The list of inputs in a multi-input JSON body, or None for a single input."""
    if isinstance(value, dict) and list(value) == ["instances"]:
        items = value["instances"]
        if not isinstance(items, list):
            raise BadInput(f'"instances" must be an array, got {_json_type(items)}',
                           reason="wrong_type")
        return items
    if not isinstance(value, list) or not value:
        return None
    if signature["input"]["kind"] == "features":
        nested = isinstance(value[0], (list, dict))
    else:  # one image is [H][W]; a list of images is three levels deep
        nested = isinstance(value[0], list) and bool(value[0]) and isinstance(value[0][0], list)
    return value if nested else None


def _instance_kind(item):
    """An instance is JSON, or an encoded image as {"b64": "<base64 PNG/JPEG>"}."""
    if isinstance(item, dict) and list(item) == ["b64"]:
        try:
            raw = base64.b64decode(item["b64"], validate=True)
        except (TypeError, ValueError, binascii.Error):
            raise BadInput('"b64" is not valid base64', reason="undecodable") from None
        return sniff_body(raw)
    return "json", item


def _decode_one(kind, value, signature):
    if signature["input"]["kind"] == "features":
        if kind == "image":
            raise BadInput("this model takes features, not an image", reason="wrong_type")
        return standardise_features(features_from_json(value, signature), signature)
    pre = signature["preprocess"]
    if kind == "image":
        grey = frame_like_mnist(grey_from_image_bytes(value), pre["image_size"])
    else:
        grey = pixels_from_json(value, pre["image_size"], pre["pixel_max"]) / pre["pixel_max"]
    return standardise_image(grey, signature)


def decode_npy(raw, signature):
    """A .npy body (no pickles): raw pixel values or raw features, one input or a batch.

    The whole array is checked and standardised with vectorised numpy: no per-row Python.
    """
    try:
        array = np.load(io.BytesIO(raw), allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise BadInput(f"not a readable .npy array: {err}", reason="undecodable") from None
    if array.dtype.kind not in "iuf":
        raise BadInput(f".npy array has dtype {array.dtype}, expected integers or floats",
                       reason="wrong_type")
    values = array.astype(np.float64)
    if signature["input"]["kind"] == "features":
        width = len(signature["preprocess"]["feature_names"])
        if values.shape not in ((width,), values.shape[:1] + (width,)) or values.ndim > 2:
            raise BadInput(f".npy array has shape {list(values.shape)}, "
                           f"expected [{width}] or [N, {width}]", reason="bad_shape")
        many, values = values.ndim == 2, values.reshape(-1, width)
    else:
        h, w = signature["preprocess"]["image_size"]
        if values.shape[-2:] != (h, w) or values.ndim not in (2, 3, 4) or (
                values.ndim == 4 and values.shape[1] != 1):
            raise BadInput(f".npy array has shape {list(values.shape)}, "
                           f"expected [{h}, {w}], [N, {h}, {w}] or [N, 1, {h}, {w}]",
                           reason="bad_shape")
        many, values = values.ndim > 2, values.reshape(-1, h, w)
    return rows_from_raw(values, signature), many


def rows_from_raw(values, signature):
    """Raw pixel values [N, H, W] or raw feature values [N, F] (float64, shape checked by
    the caller) as model rows: checked and standardised with vectorised numpy, no per-row
    Python. Used by .npy bodies and Open Inference Protocol tensors alike."""
    if signature["input"]["kind"] == "features":
        _check_finite_array(values, "feature")
        rows = standardise_features(values, signature)
    else:
        pixel_max = signature["preprocess"]["pixel_max"]
        _check_finite_array(values, "pixel")
        check_pixel_range(values, pixel_max)
        rows = standardise_image(values / pixel_max, signature)
    if not len(rows):
        raise BadInput("no instances to score: the array is empty", reason="bad_shape")
    if len(rows) > MAX_INSTANCES:
        raise BadInput(f"{len(rows)} instances in one request, more than {MAX_INSTANCES}",
                       reason="too_large")
    return rows


def _check_finite_array(values, what):
    bad = np.argwhere(~np.isfinite(values))
    if len(bad):
        at = [int(i) for i in bad[0]]
        raise BadInput(f"{what} at {at} is not a finite number: {values[tuple(at)]}",
                       reason="bad_value")


# --- images ----------------------------------------------------------------------------


def grey_from_image_bytes(raw):
    """Decodes PNG/JPEG bytes to a float64 grey image in [0, 1], shape [H, W]."""
    fmt = "PNG" if raw.startswith(PNG_MAGIC) else "JPEG"
    try:
        img = Image.open(io.BytesIO(raw), formats=(fmt,))
    except Image.DecompressionBombError:
        # PIL refuses such a header itself, before we can read the size from it.
        raise BadInput(f"image is larger than the limit of {MAX_IMAGE_PIXELS} pixels",
                       reason="too_large") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        logger.debug("unreadable %s header: %s", fmt, err)
        raise _undecodable(fmt) from None
    with img:
        width, height = img.size
        if width * height > MAX_IMAGE_PIXELS:
            raise BadInput(
                f"image is {width}x{height} pixels, "
                f"more than the limit of {MAX_IMAGE_PIXELS} pixels", reason="too_large"
            )
        try:
            img.load()
            return _grey_unit(_upright(img))
        except (OSError, SyntaxError, ValueError, EOFError) as err:
            logger.debug("undecodable %s: %s", fmt, err)
            raise _undecodable(fmt) from None


def _undecodable(fmt):
    return BadInput(f"{fmt} image could not be decoded (truncated or corrupt)",
                    reason="undecodable")


def _upright(img):
    """ImageOps.exif_transpose(img), without its copy of the many images that carry no
    orientation (or orientation 1, upright already)."""
    if img.getexif().get(ExifTags.Base.Orientation, 1) == 1:
        return img
    return ImageOps.exif_transpose(img)


def _grey_unit(img):
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        # 16-bit greys: convert("L") would clip rather than scale.
        return np.clip(np.asarray(img, dtype=np.float64) / 65535.0, 0.0, 1.0)
    if "A" in img.getbands() or "transparency" in img.info:
        # A canvas drawing is usually dark strokes on a transparent ground: treat it as paper.
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    if img.mode != "L":
        img = img.convert("L")
    return _UNIT_LEVELS.take(np.asarray(img))


def border_mean(grey):
    """Mean of the outermost ring of pixels."""
    ring = np.concatenate([grey[0, :], grey[-1, :], grey[1:-1, 0], grey[1:-1, -1]])
    # For float64, ring.mean() to the last bit, without its overhead.
    return float(ring.sum()) / ring.size


def frame_like_mnist(grey, image_size):
    """Inverts a dark-on-light image, then crops, scales and centres its ink as MNIST does."""
    if border_mean(grey) > 0.5:
        grey = 1.0 - grey
    height, width = image_size
    ink = grey > INK_THRESHOLD
    ink_rows = ink.any(axis=1)
    if not ink_rows.any():
        return resize(grey, height, width)
    (row0, row1), (col0, col1) = _span(ink_rows), _span(ink.any(axis=0))
    crop = grey[row0:row1, col0:col1]
    side = min(FRAME_SIDE, height, width)
    scale = side / max(crop.shape)
    digit = resize(
        crop, _round_half_up(crop.shape[0] * scale), _round_half_up(crop.shape[1] * scale)
    )
    centre_row, centre_col = centre_of_mass(digit)
    canvas = np.zeros((height, width), dtype=np.float64)
    top = _round_half_up((height - 1) / 2 - centre_row)
    left = _round_half_up((width - 1) / 2 - centre_col)
    paste_clipped(canvas, digit, top, left)
    return canvas


def _span(mask):
    """(first, last + 1) of the True entries of a 1-D mask that has some."""
    return int(mask.argmax()), len(mask) - int(mask[::-1].argmax())


def resize(grey, height, width):
    """Resamples a [0, 1] image; clipped because Lanczos rings past the input range."""
    height, width = max(1, height), max(1, width)
    if grey.shape == (height, width):
        return grey.copy()
    # The image shares the float32 array's memory: no copy on the way into PIL.
    pixels = np.ascontiguousarray(grey, dtype=np.float32)
    img = Image.frombuffer("F", pixels.shape[::-1], pixels, "raw", "F", 0, 1)
    out = np.asarray(img.resize((width, height), RESAMPLE), dtype=np.float64)
    return out.clip(0.0, 1.0)


def centre_of_mass(grey):
    """(row, column) of the intensity-weighted centre; the geometric centre if all dark."""
    total = grey.sum()
    if total <= 0:
        return (grey.shape[0] - 1) / 2, (grey.shape[1] - 1) / 2
    rows, cols = _index_grids(grey.shape)
    return float((rows * grey).sum() / total), float((cols * grey).sum() / total)


@functools.lru_cache(maxsize=256)
def _index_grids(shape):
    """np.indices(shape) as float64 (exact, and cheaper to multiply with a float64 image),
    read-only: digits come in a few dozen shapes, so each is made once."""
    grids = np.indices(shape, dtype=np.float64)
    grids.flags.writeable = False
    return grids


def paste_clipped(canvas, patch, top, left):
    """Writes patch into canvas at (top, left), dropping whatever falls outside."""
    r0, c0 = max(top, 0), max(left, 0)
    r1 = min(top + patch.shape[0], canvas.shape[0])
    c1 = min(left + patch.shape[1], canvas.shape[1])
    if r0 < r1 and c0 < c1:
        canvas[r0:r1, c0:c1] = patch[r0 - top : r1 - top, c0 - left : c1 - left]


def _round_half_up(x):
    # Python's round() goes to even: 4.5 -> 4 but 5.5 -> 6 would shift digits unevenly.
    return int(math.floor(x + 0.5))


def pixels_from_json(value, image_size, pixel_max):
    """A JSON pixel array ([H, W] or {"pixels": [H, W]}) as float64 [H, W].

    [1, H, W] is not taken as one image: three levels of lists are a list of images."""
    if isinstance(value, dict) and list(value) == ["pixels"]:
        value = value["pixels"]
    if not isinstance(value, list):
        raise BadInput(
            'expected a PNG or JPEG image, a pixel array or {"pixels": [...]}, '
            f"got {_json_type(value)}", reason="wrong_type"
        )
    height, width = image_size
    shape = _leading_shape(value)
    if shape != [height, width]:
        shown = f"shape {shape}" if len(shape) <= 4 else f"{len(shape)} dimensions"
        raise BadInput(f"pixel array has {shown}, expected [{height}, {width}]", reason="bad_shape")
    pixels = numbers_array(value, shape, "pixel")
    check_pixel_range(pixels, pixel_max)
    return pixels.reshape(height, width)


def check_pixel_range(pixels, pixel_max):
    """Rejects the first pixel outside [0, pixel_max]."""
    bad = np.argwhere((pixels < 0) | (pixels > pixel_max))
    if len(bad):
        at = [int(i) for i in bad[0]]
        raise BadInput(f"pixel at {at} is {pixels[tuple(at)]:g}, outside [0, {pixel_max:g}]",
                       reason="bad_value")


def _leading_shape(value):
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


# --- features --------------------------------------------------------------------------


def features_from_json(value, signature):
    """A JSON object of named features or a list of numbers, as float64 in signature order."""
    names = signature["preprocess"]["feature_names"]
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
            f"{len(names)} numbers, got {_json_type(value)}", reason="wrong_type"
        )
    return np.array(
        [finite_number(v, f"value for '{name}'") for name, v in zip(names, values, strict=False)],
        dtype=np.float64,
    )


def _check_feature_names(row, names):
    known = set(names)
    missing = [name for name in names if name not in row]
    unknown = [key for key in row if key not in known]
    problems = []
    if missing:
        problems.append(f"missing {_quoted(missing)}")
    if unknown:
        problems.append(f"unknown features: {_quoted(unknown)}")
    if missing:
        raise BadInput(f"expected {len(names)} features, got {len(row)}: " + "; ".join(problems),
                       reason="bad_features")
    if unknown:
        raise BadInput(problems[0], reason="bad_features")


def finite_number(value, what):
    """value as a float, or BadInput: booleans, strings and NaN/Infinity are not numbers."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadInput(f"{what} is {_json_type(value)}, not a number: {_describe(value)}",
                       reason="bad_value")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise BadInput(f"{what} is not a finite number: {_describe(value)}", reason="bad_value")
    return number


# --- standardising ---------------------------------------------------------------------


def standardise_image(grey, signature):
    """Pads [0, 1] images ([H, W] or [N, H, W]) with background, standardises them and shapes
    them for the model ([N, ...] for a batch)."""
    pre = signature["preprocess"]
    p, mean, std = pre["pad"], pre["mean"], pre["std"]
    height, width = grey.shape[-2:]
    x = np.empty((*grey.shape[:-2], height + 2 * p, width + 2 * p), dtype=np.float32)
    # The pad is background (0 in grey's dtype), standardised in that dtype like the pixels.
    x[...] = (grey.dtype.type(0) - mean) / std
    x[..., p : p + height, p : p + width] = (grey - mean) / std
    shape = signature["input"]["shape"][1:]
    return x.reshape(shape if grey.ndim == 2 else [-1, *shape])


def standardise_features(row, signature):
    """Standardises a feature row with the training split's mean and std."""
    pre = signature["preprocess"]
    x = (row - np.asarray(pre["mean"], dtype=np.float64)) / np.asarray(pre["std"], np.float64)
    shape = signature["input"]["shape"][1:]
    return x.reshape(shape if row.ndim == 1 else [-1, *shape]).astype(np.float32)


# --- answers ---------------------------------------------------------------------------


def encode_answer(probabilities, output, top_k=3):
    """One row of model output as the answer dict of signature.md.

    Raises ValueError (not BadInput: the request was fine) if the row is not a set of
    finite probabilities, so the caller can answer 500 instead of sending invalid JSON.
    """
    row = np.asarray(probabilities, dtype=np.float32).reshape(-1)
    if not np.all(np.isfinite(row)):
        raise ValueError(f"model returned a non-finite probability: {row.tolist()}")
    labels = output["labels"]
    if output["kind"] == "binary":
        if row.size != 1:
            raise ValueError(f"binary model returned {row.size} values for one row, expected 1")
        positive = float(row[0])
        if positive >= 0.5:
            return {"label": labels[1], "probability": positive}
        return {"label": labels[0], "probability": 1.0 - positive}
    if row.size != len(labels):
        raise ValueError(f"model returned {row.size} probabilities for {len(labels)} labels")
    # Stable sort: equal probabilities keep label order, so answers are reproducible.
    order = np.argsort(-row, kind="stable")[: max(1, top_k)]
    ranked = [{"label": labels[i], "probability": float(row[i])} for i in order]
    return {"label": ranked[0]["label"], "probability": ranked[0]["probability"], "top_k": ranked}


def error_body(message, code=400):
    """The JSON body for a request that is not answered."""
    return {"error": message, "code": code}


# --- messages --------------------------------------------------------------------------


def _json_type(value):
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _describe(value, limit=40):
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _quoted(names):
    shown = ", ".join(f"'{name}'" for name in names[:MAX_LISTED_NAMES])
    extra = len(names) - MAX_LISTED_NAMES
    return shown + (f" and {extra} more" if extra > 0 else "")
