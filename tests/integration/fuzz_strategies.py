"""Hypothesis strategies for test_fuzz_served.py: request bodies made by mutating the valid
bodies of each input form (docs/signature.md), and raw bytes under every content type.

A strategy here returns a `Body` (bytes, content type, and a few words on how it was made,
for the failure report) or, for the Open Inference Protocol, the JSON text of an infer body.
Large arrays come from a drawn seed through numpy, so that an example stays cheap to draw
and still shrinks (to seed 0).
"""

from __future__ import annotations

import ast
import base64
import io
import json
import math
import string
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import numpy as np
from hypothesis import strategies as st
from PIL import Image

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
SEVEN = (FIXTURES / "digits" / "7.png").read_bytes()
PAPER_SEVEN = (FIXTURES / "digits" / "paper_7.jpg").read_bytes()
BENIGN = json.loads((FIXTURES / "breast_cancer" / "benign.json").read_text())
FEATURE_NAMES = list(BENIGN)
SIDE = 28  # the digit models' declared size, [28, 28], one channel
PIXELS = np.asarray(Image.open(FIXTURES / "digits" / "7.png")).tolist()

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_SOI = b"\xff\xd8"
NPY_MAGIC = b"\x93NUMPY"

JSON = "application/json"
CONTENT_TYPES = ["application/json", "image/png", "image/jpeg", "application/x-npy",
                 "text/csv", "text/plain", "application/octet-stream",
                 "application/x-www-form-urlencoded", "multipart/form-data"]
ODD_CONTENT_TYPES = ["", "*/*", "application/json; charset=utf-16", "text/csv; charset=latin-1",
                     "image/png; q=0.5", "APPLICATION/JSON", "application/jsonl",
                     "text/json", "image/gif", "application/x-npy; version=3",
                     "multipart/mixed; boundary=x", "text/html"]


@dataclass(frozen=True)
class Body:
    data: bytes
    content_type: str
    how: str  # how the body was made, for a failure's report

    def __repr__(self):
        shown = self.data if len(self.data) <= 300 else self.data[:300] + b"..."
        return f"Body({self.how!r}, {self.content_type!r}, {len(self.data)} bytes: {shown!r})"


# --- JSON with tokens json.dumps cannot write ------------------------------------------


class Raw(str):
    """A JSON token written as it is: a number of 5,000 digits, 1e999999, a deep nesting."""


def dumps(value) -> str:
    """JSON text of `value`, where Raw tokens stand as they are and NaN/Infinity are the bare
    tokens numpy-based clients write."""
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, list):
        return "[" + ",".join(dumps(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(json.dumps(str(k)) + ":" + dumps(v) for k, v in value.items()) + "}"
    return json.dumps(value)


def json_body(value, how, content_type=JSON) -> Body:
    return Body(dumps(value).encode("utf-8", "surrogatepass"), content_type, how)


NUMBER_TOKENS = ["1" + "0" * 5000, "-" + "9" * 4301, "9" * 4300, "1e999999", "-1e999999",
                 "1e-999999", "-0", "0e0", "1E400", "2e308", "3.4028236e38", "3.4028235e38",
                 "1.7976931348623157e308", "4.9e-324", "9007199254740993",
                 "18446744073709551616", "-9223372036854775809", "NaN", "Infinity",
                 "-Infinity", "0." + "0" * 3000 + "1", "255.0000000000000001", "00", "+1",
                 ".5", "1.", "0x10", "1_000"]
ODD_STRINGS = ["", "0", "7", "1e3", "NaN", "\ud800", "\udfff\ud800", "\x00", "ℵ₀", "٣",
               "🦀" * 50, "x" * 5000, "\u202e", "null", "[]", "{}"]


def scalars():
    """Any JSON scalar, with the values that break number handling well represented."""
    return st.one_of(
        st.none(), st.booleans(), st.integers(),
        st.sampled_from([0, 1, 255, 256, -1, 2**31, 2**53 + 1, 2**63, 2**64, -2**63 - 1,
                         10**30, 10**308 * 10]),
        st.floats(), st.floats(min_value=-300, max_value=300),
        st.sampled_from(NUMBER_TOKENS).map(Raw),
        st.text(max_size=12), st.sampled_from(ODD_STRINGS))


def json_trees(max_leaves=10):
    """Any small JSON value, nested."""
    return st.recursive(
        scalars(),
        lambda kids: st.lists(kids, max_size=4) | st.dictionaries(
            st.one_of(st.text(max_size=8), st.sampled_from(["b64", "instances", "pixels",
                                                            "input", "data"])), kids,
            max_size=4),
        max_leaves=max_leaves)


def deep_nesting():
    """An array or object nested deeper than any parser's recursion allows."""
    return st.builds(
        lambda depth, opener: Raw(opener * depth + "0" + {"[": "]", '{"a":': "}"}[opener] * depth),
        st.sampled_from([2, 50, 999, 1001, 5000, 100_000]), st.sampled_from(["[", '{"a":']))


# --- encoded images --------------------------------------------------------------------


def png_chunk(kind: bytes, data: bytes, crc_ok=True) -> bytes:
    crc = zlib.crc32(kind + data) if crc_ok else zlib.crc32(kind + data) ^ 1
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


@st.composite
def absurd_pngs(draw):
    """A PNG whose header claims any size, depth and colour type, with little or no data."""
    side = st.one_of(st.integers(0, 2**32 - 1),
                     st.sampled_from([0, 1, 28, 4096, 4097, 65535, 2**31 - 1, 2**32 - 1]))
    width, height = draw(side), draw(side)
    depth = draw(st.sampled_from([1, 2, 4, 8, 16, 0, 3, 255]))
    colour = draw(st.sampled_from([0, 2, 3, 4, 6, 1, 7]))
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0,
                       draw(st.sampled_from([0, 1, 2])))
    idat = draw(st.sampled_from(["none", "zeros", "random"]))
    if idat == "zeros":
        data = zlib.compress(b"\0" * min(1 << 20, (width * 2 + 1) * height))
    else:
        data = b"" if idat == "none" else draw(st.binary(max_size=64))
    chunks = png_chunk(b"IHDR", ihdr, draw(st.booleans()))
    if colour == 3 and draw(st.booleans()):
        chunks += png_chunk(b"PLTE", draw(st.binary(max_size=30)))
    if idat != "none":
        chunks += png_chunk(b"IDAT", data)
    return PNG_MAGIC + chunks + (png_chunk(b"IEND", b"") if draw(st.booleans()) else b"")


@st.composite
def absurd_jpegs(draw):
    """A JPEG whose frame header claims any size and component count, then garbage."""
    height, width = draw(st.integers(0, 65535)), draw(st.integers(0, 65535))
    components = draw(st.sampled_from([0, 1, 3, 4, 255]))
    sof = struct.pack(">BHHB", 8, height, width, components) + b"\x01\x11\x00" * min(
        components, 4)
    marker = draw(st.sampled_from([b"\xff\xc0", b"\xff\xc2", b"\xff\xc3", b"\xff\xcf"]))
    body = JPEG_SOI + marker + struct.pack(">H", len(sof) + 2) + sof
    body += draw(st.binary(max_size=80))
    return body + (b"\xff\xd9" if draw(st.booleans()) else b"")


@st.composite
def odd_valid_images(draw):
    """A real PNG or JPEG of an unusual mode or size (16-bit, palette, 1-bit, CMYK, alpha,
    an EXIF orientation tag of any value)."""
    mode = draw(st.sampled_from(["1", "L", "LA", "P", "RGB", "RGBA", "I;16", "CMYK"]))
    fmt = "JPEG" if mode in ("L", "RGB", "CMYK") and draw(st.booleans()) else "PNG"
    if fmt == "PNG" and mode == "CMYK":
        mode = "RGBA"
    size = (draw(st.integers(1, 80)), draw(st.integers(1, 80)))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    img = Image.frombytes(mode, size, rng.bytes(len(Image.new(mode, size).tobytes())))
    out = io.BytesIO()
    exif = Image.Exif()
    if draw(st.booleans()):
        exif[0x0112] = draw(st.integers(0, 65535))  # Orientation
    img.save(out, format=fmt, exif=exif.tobytes())
    return out.getvalue()


def truncated(raw):
    return st.integers(0, len(raw) - 1).map(lambda k: raw[:k])


@st.composite
def bit_flips(draw, raw):
    data = bytearray(raw)
    for _ in range(draw(st.integers(1, 8))):
        i = draw(st.integers(0, len(data) - 1))
        data[i] = draw(st.integers(0, 255))
    return bytes(data)


def image_bytes():
    """Encoded image bytes: valid, odd, truncated, corrupted, or lying in their headers."""
    return st.one_of(
        st.sampled_from([SEVEN, PAPER_SEVEN]), odd_valid_images(),
        truncated(SEVEN), truncated(PAPER_SEVEN), bit_flips(SEVEN), bit_flips(PAPER_SEVEN),
        absurd_pngs(), absurd_jpegs(),
        st.binary(max_size=200).map(lambda b: PNG_MAGIC + b),
        st.binary(max_size=200).map(lambda b: b"\xff\xd8\xff" + b))


def image_bodies():
    return st.builds(lambda raw, ct: Body(raw, ct, "encoded image"), image_bytes(),
                     st.sampled_from(["image/png", "image/jpeg", "application/octet-stream",
                                      JSON, "text/plain", ""]))


# --- JSON bodies for the digit models --------------------------------------------------


def seeded_pixels(seed, shape, low=0, high=256):
    return np.random.default_rng(seed).integers(low, high, size=shape).tolist()


@st.composite
def pixel_grids(draw):
    """A 28x28 pixel array, mutated: cells of any JSON value, rows of any length, channels,
    an extra level, another shape."""
    grid = [row[:] for row in draw(st.one_of(
        st.just(PIXELS), st.integers(0, 2**16).map(lambda s: seeded_pixels(s, (SIDE, SIDE)))))]
    how = draw(st.sampled_from(["valid", "cells", "row", "shape", "channels", "deeper",
                                "floats"]))
    if how == "cells":
        for _ in range(draw(st.integers(1, 4))):
            grid[draw(st.integers(0, SIDE - 1))][draw(st.integers(0, SIDE - 1))] = draw(
                json_trees(4))
    elif how == "row":
        grid[draw(st.integers(0, SIDE - 1))] = draw(json_trees(6))
    elif how == "shape":
        h, w = draw(st.integers(0, 40)), draw(st.integers(0, 40))
        grid = seeded_pixels(draw(st.integers(0, 99)), (h, w))
    elif how == "channels":
        c = draw(st.integers(0, 4))
        grid = [[[v] * c for v in row] for row in grid]
    elif how == "deeper":
        for _ in range(draw(st.integers(1, 3))):
            grid = [grid]
    elif how == "floats":
        grid = np.random.default_rng(draw(st.integers(0, 99))).uniform(
            draw(st.sampled_from([-1.0, 0.0, 254.0])), 256.0, (SIDE, SIDE)).tolist()
    return grid


@st.composite
def b64_instances(draw):
    """{"b64": ...} holding an encoded image, or something that is not base64 of one."""
    raw = draw(image_bytes())
    how = draw(st.sampled_from(["ok", "ok", "urlsafe", "newlines", "unpadded", "garbage",
                                "not a string", "extra key"]))
    text = base64.b64encode(raw).decode("ascii")
    if how == "urlsafe":
        text = base64.urlsafe_b64encode(raw).decode("ascii")
    elif how == "newlines":
        text = "\n".join(text[i:i + 76] for i in range(0, len(text), 76))
    elif how == "unpadded":
        text = text.rstrip("=")
    elif how == "garbage":
        text = draw(st.text(max_size=60))
    if how == "not a string":
        return {"b64": draw(json_trees(4))}
    if how == "extra key":
        return {"b64": text, draw(st.text(max_size=5)): draw(scalars())}
    return {"b64": text}


def image_instances():
    return st.one_of(pixel_grids(), b64_instances(), json_trees(),
                     pixel_grids().map(lambda g: {"pixels": g}),
                     st.builds(lambda g, k, v: {"pixels": g, k: v}, pixel_grids(),
                               st.text(max_size=5), scalars()))


@st.composite
def image_json_bodies(draw):
    """A JSON body for a digit model: one instance, a list, {"instances": ...}, mutated."""
    envelope = draw(st.sampled_from(["bare", "instances", "list", "instances not a list",
                                     "instances plus a key", "many small", "deep"]))
    if envelope == "bare":
        value = draw(image_instances())
    elif envelope == "instances":
        value = {"instances": draw(st.lists(image_instances(), max_size=4))}
    elif envelope == "list":
        value = draw(st.lists(image_instances(), min_size=1, max_size=4))
    elif envelope == "instances not a list":
        value = {"instances": draw(json_trees(4).filter(lambda v: not isinstance(v, list)))}
    elif envelope == "instances plus a key":
        value = {"instances": [PIXELS], draw(st.text(max_size=8)): draw(json_trees(4))}
    elif envelope == "many small":
        item = draw(st.sampled_from([0, [], [[0]], {"b64": ""}, {"b64": "iVBORw0KGgo="}]))
        value = {"instances": [item] * draw(st.sampled_from([511, 512, 513, 5000]))}
    else:
        value = draw(st.one_of(deep_nesting(), deep_nesting().map(lambda d: {"instances": d})))
    return json_body(value, f"image json: {envelope}",
                     draw(st.sampled_from([JSON, JSON, "text/plain", "application/x-npy"])))


# --- JSON bodies for a features model --------------------------------------------------


@st.composite
def feature_rows(draw):
    """A row of the binary model's 30 features, as an object or a list, mutated."""
    row = dict(BENIGN)
    how = draw(st.sampled_from(["valid", "value", "drop", "add", "rename", "list",
                                "short list", "long list", "key order", "scaled"]))
    name = draw(st.sampled_from(FEATURE_NAMES))
    if how == "value":
        row[name] = draw(json_trees(4))
    elif how == "drop":
        del row[name]
    elif how == "add":
        row[draw(st.one_of(st.text(max_size=30), st.just("x" * 5000)))] = draw(scalars())
    elif how == "rename":
        row[draw(st.text(max_size=12))] = row.pop(name)
    elif how == "key order":
        row = dict(reversed(row.items()))
    elif how == "scaled":
        factor = draw(st.sampled_from([1e30, 1e38, 1e39, -1e39, 1e-300, 0.0, -1.0]))
        row = {k: v * factor for k, v in row.items()}
    values = list(row.values())
    if how == "list":
        values[draw(st.integers(0, 29))] = draw(scalars())
        return values
    if how == "short list":
        return values[:draw(st.integers(0, 29))]
    if how == "long list":
        return values + draw(st.lists(scalars(), min_size=1, max_size=5))
    return row


@st.composite
def feature_json_bodies(draw):
    envelope = draw(st.sampled_from(["bare", "instances", "list", "instances not a list",
                                     "wrapped", "many", "deep", "any json"]))
    if envelope == "bare":
        value = draw(feature_rows())
    elif envelope == "instances":
        value = {"instances": draw(st.lists(feature_rows(), max_size=4))}
    elif envelope == "list":
        value = draw(st.lists(feature_rows(), min_size=1, max_size=4))
    elif envelope == "instances not a list":
        value = {"instances": draw(json_trees(4).filter(lambda v: not isinstance(v, list)))}
    elif envelope == "wrapped":
        value = {draw(st.sampled_from(["input", "data", "features", "inputs"])): draw(
            feature_rows())}
    elif envelope == "many":
        value = {"instances": [BENIGN] * draw(st.sampled_from([512, 513, 2000]))}
    elif envelope == "deep":
        value = draw(deep_nesting())
    else:
        value = draw(json_trees(20))
    return json_body(value, f"features json: {envelope}",
                     draw(st.sampled_from([JSON, JSON, "text/plain", "text/csv"])))


# --- CSV -------------------------------------------------------------------------------

CSV_CELLS = ["", "NaN", "inf", "-inf", "1e999", "1" + "0" * 5000, '"1,5"', '"', "ℵ", "true",
             "0x1F", " 3 ", "1;2", "\x00", "null", "[1]", "{}"]


@st.composite
def csv_bodies(draw):
    """CSV of the binary model's features: headers or not, wrong column counts, garbage."""
    sep = draw(st.sampled_from([",", ";", "\t", "|"]))
    newline = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    lines = []
    if draw(st.booleans()):
        names = [n for n in FEATURE_NAMES if draw(st.integers(0, 9))]
        names += draw(st.lists(st.text(max_size=10), max_size=2))
        lines.append(sep.join(f'"{n}"' if draw(st.booleans()) else n for n in names))
    for _ in range(draw(st.integers(0, 3))):
        width = draw(st.sampled_from([30, 30, 29, 31, 0, 1, 60]))
        cells = [repr(v) for v in list(BENIGN.values()) * 2][:width]
        for _ in range(draw(st.integers(0, 3))):
            if cells:
                cells[draw(st.integers(0, len(cells) - 1))] = draw(
                    st.one_of(st.sampled_from(CSV_CELLS), st.text(max_size=8)))
        lines.append(sep.join(cells))
    text = newline.join(lines) + (newline if draw(st.booleans()) else "")
    if draw(st.booleans()):
        text = "\ufeff" + text
    encoding = draw(st.sampled_from(["utf-8", "utf-8", "utf-16", "latin-1"]))
    data = text.encode(encoding, "replace") if encoding != "utf-8" else text.encode(
        "utf-8", "surrogatepass")
    return Body(data, draw(st.sampled_from(["text/csv", "text/csv; header=present",
                                            "application/csv", JSON, "text/plain"])),
                f"csv ({encoding})")


# --- .npy ------------------------------------------------------------------------------

NPY_DTYPES = ["<f4", "<f8", ">f8", "<f2", "|u1", "<i8", ">i2", "<u8", "|b1", "<c8",
              "<U3", "|S2", "<M8[s]", "<m8[s]", "|V4"]
NPY_SHAPES = [(28, 28), (1, 28, 28), (2, 28, 28), (1, 1, 28, 28), (28, 28, 1), (28, 28, 3),
              (0, 28, 28), (1, 2, 28, 28), (784,), (30,), (1, 30), (3, 30), (0, 30), (29,),
              (1, 31), (), (1,), (513, 28, 28), (513, 30), (1, 30, 1), (2, 3, 4, 5, 6)]
# As Python literals, as a .npy header holds them: dtype names, and structured dtypes.
NPY_DESCRS = ["'<f4'", "'<f8'", "'|u1'", "'|O'", "'<U0'", "'|S0'", "'|V0'", "'<U3'", "'<M8[D]'",
              "'|b1'", "'foo'", "''", "'<f16'", "'>c16'", "'<i3'", "[('a', '<f4')]",
              "[('a', '|O')]", "[('a', '<f4', (28, 28))]", "{'names': ['a'], 'formats': ['<f4']}",
              "None", "3"]


@st.composite
def valid_npy(draw):
    """A well-formed .npy of any numeric or odd dtype and shape, values possibly off-range."""
    shape = draw(st.sampled_from(NPY_SHAPES))
    dtype = np.dtype(draw(st.sampled_from(NPY_DTYPES)))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    if dtype.kind in "fiub":
        high = draw(st.sampled_from([2, 256, 1000]))
        values = rng.integers(0, high, size=shape).astype(dtype)
        if dtype.kind == "f" and values.size and draw(st.booleans()):
            flat = values.reshape(-1)
            flat[draw(st.integers(0, flat.size - 1))] = draw(st.sampled_from(
                [np.nan, np.inf, -np.inf, -1.0, 255.5, 1e300]))
    else:
        values = np.zeros(shape, dtype=dtype)
    if draw(st.booleans()):
        values = np.asfortranarray(values)
    out = io.BytesIO()
    np.save(out, values, allow_pickle=False)
    return out.getvalue()


@st.composite
def pickled_npy(draw):
    """An object array: np.save pickles it."""
    items = draw(st.lists(st.one_of(scalars(), st.just([1, 2])), min_size=1, max_size=4))
    values = np.empty(len(items), dtype=object)
    values[:] = [v if not isinstance(v, Raw) else str(v) for v in items]
    out = io.BytesIO()
    np.save(out, values, allow_pickle=True)
    return out.getvalue()


@st.composite
def lying_npy(draw):
    """A .npy header of any version, dtype, order and shape (negative, huge, not a tuple),
    followed by data that may or may not fit it."""
    descr = draw(st.one_of(st.sampled_from(NPY_DESCRS), st.text(max_size=6).map(repr)))
    dim = st.one_of(st.integers(-5, 40), st.sampled_from([10**6, 2**31, 2**63, -2**63]),
                    st.booleans())
    shape = draw(st.one_of(st.lists(dim, max_size=4).map(tuple), st.lists(dim, max_size=3),
                           scalars()))
    fortran = draw(st.sampled_from([False, True, 0, 1, None, "yes"]))
    fields = [f"'descr': {descr}",
              f"'fortran_order': {fortran!r}", f"'shape': {shape!r}"]
    if draw(st.booleans()):
        fields.pop(draw(st.integers(0, 2)))
    if draw(st.booleans()):
        fields.append(f"{draw(st.text(max_size=5))!r}: {draw(st.integers())}")
    header = "{" + ", ".join(fields) + ", }"
    if draw(st.integers(0, 9)) == 0:
        header = draw(st.text(max_size=40))
    version = draw(st.sampled_from([(1, 0), (2, 0), (3, 0), (0, 0), (255, 255)]))
    size_format = "<H" if version[0] in (1, 0) else "<I"
    text = header.encode("utf-8", "surrogatepass")
    prefix = len(NPY_MAGIC) + 2 + struct.calcsize(size_format)
    text += b" " * ((-(prefix + len(text) + 1)) % 64) + b"\n"
    length = len(text) if draw(st.integers(0, 5)) else draw(st.integers(0, 2**16 - 1))
    head = NPY_MAGIC + bytes(version) + struct.pack(size_format, length) + text
    try:
        itemsize = np.dtype(ast.literal_eval(descr)).itemsize
        count = math.prod(shape) if isinstance(shape, (tuple, list)) else -1
    except (ValueError, TypeError, SyntaxError):  # a descr numpy cannot read: no data fits
        itemsize, count = 1, -1
    fitting = count * itemsize if 0 <= count * itemsize <= 1 << 16 else None
    if fitting is not None and draw(st.booleans()):
        return head + np.random.default_rng(0).bytes(fitting)
    return head + draw(st.binary(max_size=64))


def npy_bodies():
    return st.builds(
        lambda raw, how, ct: Body(raw, ct, how),
        st.one_of(valid_npy(), lying_npy(), pickled_npy(),
                  st.binary(max_size=100).map(lambda b: NPY_MAGIC + b)),
        st.just(".npy"),
        st.sampled_from(["application/x-npy", "application/x-npy", "application/octet-stream",
                         JSON, "image/png"]))


# --- forms -----------------------------------------------------------------------------

FIELD_NAMES = ["data", "body", "input", "input_ids", "", "data[]", "Data"]


def field_values():
    """What a form field may hold: a valid body, a mutated one, or random bytes."""
    return st.one_of(
        st.sampled_from([SEVEN, json.dumps(BENIGN).encode(), json.dumps(PIXELS).encode()]),
        image_bytes(), st.binary(max_size=200),
        st.builds(lambda b: b.data, feature_json_bodies()))


@st.composite
def urlencoded_bodies(draw):
    pairs = []
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.one_of(st.sampled_from(FIELD_NAMES), st.text(max_size=8)))
        value = draw(field_values())
        how = draw(st.sampled_from(["quoted", "raw", "bad escape"]))
        if how == "quoted":
            pairs.append(quote(name, safe="") + "=" + quote(value, safe=""))
        elif how == "raw":
            pairs.append(name + "=" + value.decode("latin-1"))
        else:
            pairs.append(name + "=%" + draw(st.sampled_from(["", "z", "zz", "4", "u1234"])))
    data = "&".join(pairs).encode("utf-8", "surrogatepass")
    return Body(data, draw(st.sampled_from(["application/x-www-form-urlencoded",
                                            "application/x-www-form-urlencoded; charset=utf-8",
                                            "application/x-www-form-urlencoded; charset=bogus"])),
                "urlencoded form")


BOUNDARY_CHARS = string.ascii_letters + string.digits + "'()+_,-./:=?"


@st.composite
def multipart_bodies(draw):
    """A multipart/form-data body: parts with any names, filenames, types and contents, then
    broken in one of several ways."""
    boundary = draw(st.one_of(st.text(BOUNDARY_CHARS, min_size=1, max_size=70),
                              st.text(max_size=20)))
    crlf = draw(st.sampled_from([b"\r\n", b"\r\n", b"\n"]))
    out = b""
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.one_of(st.sampled_from(FIELD_NAMES), st.text(max_size=8)))
        headers = [f'Content-Disposition: form-data; name="{name}"']
        if draw(st.booleans()):
            headers[0] += f'; filename="{draw(st.text(max_size=8))}"'
        if draw(st.booleans()):
            headers.append(f"Content-Type: {draw(st.sampled_from(CONTENT_TYPES))}")
        if draw(st.integers(0, 4)) == 0:
            headers = [draw(st.text(max_size=30))]
        head = crlf.join(h.encode("utf-8", "surrogatepass") for h in headers)
        out += b"--" + boundary.encode("utf-8", "surrogatepass") + crlf + head + crlf + crlf
        out += draw(field_values()) + crlf
    ending = draw(st.sampled_from(["closed", "closed", "open", "none", "garbage"]))
    if ending == "closed":
        out += b"--" + boundary.encode("utf-8", "surrogatepass") + b"--" + crlf
    elif ending == "garbage":
        out += draw(st.binary(max_size=40))
    elif ending == "open":
        out += b"--" + boundary.encode("utf-8", "surrogatepass") + crlf
    header_boundary = boundary if draw(st.integers(0, 4)) else draw(st.text(max_size=10))
    content_type = draw(st.sampled_from([
        f"multipart/form-data; boundary={header_boundary}",
        f'multipart/form-data; boundary="{header_boundary}"',
        "multipart/form-data", f"multipart/form-data; charset=utf-8; boundary={header_boundary}"]))
    return Body(out, content_type, f"multipart ({ending})")


# --- raw bytes -------------------------------------------------------------------------


def raw_bodies():
    """Random bytes (some behind a magic number that leads a decoder further) under every
    content type."""
    prefixes = st.sampled_from([b"", b"", b"{", b"[", b'{"instances": ', PNG_MAGIC,
                                b"\xff\xd8\xff", NPY_MAGIC + b"\x01\x00", b"\xef\xbb\xbf",
                                b"--x\r\n"])
    return st.builds(lambda prefix, tail, ct: Body(prefix + tail, ct, "random bytes"),
                     prefixes, st.binary(max_size=600) | st.binary(min_size=600, max_size=3000),
                     st.one_of(st.sampled_from(CONTENT_TYPES), st.sampled_from(ODD_CONTENT_TYPES),
                               st.text(string.printable.strip(), max_size=30)))


# --- the Open Inference Protocol -------------------------------------------------------

DATATYPES = ["FP16", "FP32", "FP64", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16",
             "INT32", "INT64", "BOOL", "BYTES", "fp32", "", "FP8", "BF16"]


def oip_shapes(valid):
    dim = st.one_of(st.integers(-3, 40), st.sampled_from([784, 2**31, 2**63, 10**30]),
                    st.floats(), st.text(max_size=3), st.none())
    return st.one_of(st.just(valid), st.lists(dim, max_size=5), json_trees(4))


@st.composite
def oip_tensors(draw, kind):
    """One input tensor for a digit model (kind "image") or the binary model ("features")."""
    n = draw(st.integers(0, 3))
    row = [SIDE, SIDE] if kind == "image" else [30]
    valid_shape = draw(st.sampled_from([[n, *row], [n, 1, *row]] if kind == "image" else
                                       [[n, *row]]))
    shape = draw(oip_shapes(valid_shape))
    seed = draw(st.integers(0, 2**16))
    high = 256 if kind == "image" else 30
    flat = np.random.default_rng(seed).integers(0, high, size=n * math.prod(row)).tolist()
    how = draw(st.sampled_from(["flat", "flat", "nested", "cells", "short", "long",
                                "not a list", "strings"]))
    data = flat
    if how == "nested" and n:
        data = np.asarray(flat).reshape(n, *row).tolist()
    elif how == "cells" and flat:
        for _ in range(draw(st.integers(1, 3))):
            data[draw(st.integers(0, len(flat) - 1))] = draw(scalars())
    elif how == "short":
        data = flat[:draw(st.integers(0, max(0, len(flat) - 1)))]
    elif how == "long":
        data = flat + draw(st.lists(scalars(), min_size=1, max_size=3))
    elif how == "not a list":
        data = draw(json_trees(4))
    elif how == "strings":
        data = [str(v) for v in flat]
    tensor = {"name": draw(st.one_of(st.just("input"), st.just("input"), st.text(max_size=6),
                                     scalars())),
              "shape": shape, "datatype": draw(st.one_of(st.sampled_from(DATATYPES), scalars())),
              "data": data}
    if draw(st.integers(0, 4)) == 0:
        tensor.pop(draw(st.sampled_from(list(tensor))))
    if draw(st.integers(0, 4)) == 0:
        tensor["parameters"] = draw(json_trees(4))
    return tensor


@st.composite
def oip_bodies(draw, kind):
    """The JSON text of an infer request: tensors of any name, datatype, shape and data, and
    the other keys (id, parameters, outputs) of any value."""
    body = {"inputs": draw(st.lists(oip_tensors(kind), max_size=3))}
    if draw(st.booleans()):
        body["id"] = draw(st.one_of(st.text(max_size=10), scalars()))
    if draw(st.integers(0, 3)) == 0:
        body["outputs"] = draw(st.one_of(
            st.lists(st.fixed_dictionaries({"name": st.sampled_from(
                ["probabilities", "label", "x", ""])}), max_size=3), json_trees(4)))
    if draw(st.integers(0, 4)) == 0:
        body["parameters"] = draw(json_trees(4))
    how = draw(st.sampled_from(["tensors"] * 6 + ["no inputs", "inputs not a list",
                                                  "not an object", "extra key", "deep"]))
    if how == "no inputs":
        del body["inputs"]
    elif how == "inputs not a list":
        body["inputs"] = draw(json_trees(4).filter(lambda v: not isinstance(v, list)))
    elif how == "not an object":
        body = draw(json_trees(6).filter(lambda v: not isinstance(v, dict)))
    elif how == "extra key":
        body[draw(st.text(max_size=8))] = draw(json_trees(4))
    elif how == "deep":
        body["inputs"] = draw(deep_nesting())
    return dumps(body).encode("utf-8", "surrogatepass")


# Bytes per element of each binary datatype; BYTES elements carry their own length.
BINARY_WIDTH = {"BOOL": 1, "INT8": 1, "UINT8": 1, "INT16": 2, "UINT16": 2, "FP16": 2,
                "INT32": 4, "UINT32": 4, "FP32": 4, "INT64": 8, "UINT64": 8, "FP64": 8,
                "BYTES": 1}
# The bounds a binary tensor's size is drawn around: rows (limits.MAX_INSTANCES), values
# (limits.MAX_REQUEST_VALUES) and bytes (the 4 MiB body the server receives).
MAX_ROWS = 512
MAX_VALUES = 1 << 20
MAX_BODY = 4 * 1024 * 1024


@st.composite
def binary_oip_bodies(draw, kind):
    """(body, JSON header length) of the binary tensor data extension: one tensor whose
    rows, values and bytes are drawn at, just under and just over the bounds (or tiny), its
    binary_data_size true or off by a little, and the bytes that follow as many as it says
    (cut to what a body may hold) or not."""
    row = draw(st.sampled_from([[SIDE, SIDE], [1, SIDE, SIDE], [30], [2049], [],
                                [MAX_VALUES // MAX_ROWS + 1]]))
    if kind == "features" and draw(st.booleans()):
        row = [30]
    rows = draw(st.sampled_from([0, 1, 2, MAX_ROWS - 1, MAX_ROWS, MAX_ROWS + 1]))
    shape = [rows, *row]
    if draw(st.integers(0, 3)) == 0:  # flat, as large as a body may carry: the probe
        shape = [draw(st.sampled_from([MAX_VALUES, MAX_VALUES + 1, MAX_BODY // 4, MAX_BODY]))]
    datatype = draw(st.sampled_from(list(BINARY_WIDTH)))
    size = math.prod(shape) * BINARY_WIDTH[datatype] + draw(st.sampled_from([0, 0, 0, -1, 1]))
    header = dumps({"inputs": [{"name": "input", "shape": shape, "datatype": datatype,
                                "parameters": {"binary_data_size": size}}]}).encode()
    sent = max(0, min(size + draw(st.sampled_from([0, 0, -1, 1])), MAX_BODY - len(header)))
    seed = draw(st.integers(0, 2**16))
    data = np.random.default_rng(seed).integers(0, 2, size=sent, dtype=np.uint8).tobytes()
    return header + data, len(header)


# --- methods, paths and headers --------------------------------------------------------

METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE"]
TOKEN_CHARS = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"


def methods():
    return st.one_of(st.sampled_from(METHODS), st.text(TOKEN_CHARS, min_size=1, max_size=10))


def path_segments():
    return st.one_of(st.text(string.ascii_letters + string.digits + "-._~:@", max_size=12),
                     st.binary(max_size=12).map(lambda b: quote(b, safe="")),
                     st.sampled_from(["..", ".", "%2e%2e", "%00", "%2F", "1.0", "versions",
                                      "infer", "ready", "x" * 3000]))


@st.composite
def paths(draw, templates, models):
    """A route from `templates` (NAME: a served model or not), or a random path; with or
    without a query string. Returns (route label, path)."""
    template = draw(st.sampled_from(templates))
    if template == "(random)":
        path = "/" + "/".join(draw(st.lists(path_segments(), max_size=5)))
    else:
        name = draw(st.one_of(st.sampled_from(models), st.sampled_from(["nope", "LENET"]),
                              path_segments()))
        path = template.replace("NAME", name)
    if draw(st.integers(0, 3)) == 0:
        path += "?" + "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in draw(
            st.lists(st.tuples(st.sampled_from(["model_name", "x", ""]), st.text(max_size=6)),
                     max_size=3)))
    return template, path


HEADER_NAMES = ["Content-Type", "Accept", "Accept-Encoding", "Content-Encoding", "Expect",
                "Authorization", "kiln-protocol", "Host", "Connection", "X-Request-Id",
                "Origin", "Access-Control-Request-Method", "Cookie", "Range", "If-None-Match",
                "Upgrade", "X-Forwarded-For", "Trailer"]
HEADER_VALUES = [b"oip", b"gzip", b"br, gzip;q=0", b"100-continue", b"nonsense", b"Bearer",
                 b"Bearer ", b"Basic Zm9vOmJhcg==", b"close", b"keep-alive", b"h2c",
                 b"bytes=0-1", b"*/*", b"application/json", b"\xff\xfe", b"x" * 9000,
                 b"websocket", b""]


def header_sets():
    """A few headers of any name and value, never ones that change how the body is framed
    (Content-Length, Transfer-Encoding): a lie there only makes the server wait for bytes."""
    name = st.one_of(st.sampled_from(HEADER_NAMES), st.text(TOKEN_CHARS, min_size=1,
                                                            max_size=20))
    value = st.one_of(st.sampled_from(HEADER_VALUES), st.binary(max_size=40).map(
        lambda b: b.replace(b"\r", b"").replace(b"\n", b"").strip()))
    return st.dictionaries(name.filter(lambda n: n.lower() not in (
        "content-length", "transfer-encoding")), value, max_size=4)


# --- paths that need normalising (issue 16) ---------------------------------------------

# Spellings of "." and ".." segments and of separators that nginx decodes or merges before it
# routes, and that a server behind it may read otherwise.
DOT_SEGMENTS = ["..", "%2e%2e", "%2E%2E", ".%2e", "%2e.", ".", "%2e"]
SEPARATORS = ["/", "%2F", "%2f", "\\", "%5C", "%5c", "//"]


@st.composite
def climbing_paths(draw, starts, targets):
    """A keyed route, then one to five dot segments in any spelling, then a route that needs no
    key: a path that a normalising router may take for the open route while the server behind
    it reads the keyed one. Every one needs normalising. Returns (label, path)."""
    start, target = draw(st.sampled_from(starts)), draw(st.sampled_from(targets))
    climb = "".join(draw(st.sampled_from(SEPARATORS)) + draw(st.sampled_from(DOT_SEGMENTS))
                    for _ in range(draw(st.integers(1, 5))))
    path = start + climb + target
    if draw(st.booleans()):
        path += "?" + draw(st.sampled_from(["", "x=/../ping", "model_name=lenet"]))
    return f"{start} .. {target}", path
