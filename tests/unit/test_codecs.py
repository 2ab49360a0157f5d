import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from kiln.handlers import answers, errors, images, rest
from kiln.handlers import signature as signature_module
from kiln.handlers.errors import BadInput

MEAN, STD = 0.1307, 0.3081
BACKGROUND = np.float32((0.0 - MEAN) / STD)
FULL_INK = np.float32((1.0 - MEAN) / STD)


def encode_image(img, fmt="PNG", **options):
    buffer = io.BytesIO()
    img.save(buffer, fmt, **options)
    return buffer.getvalue()


def framed_square():
    expected = np.zeros((28, 28))
    expected[4:24, 4:24] = 1.0
    return expected


def dark_bar_on_paper_rgb():
    """A 300x400 white RGB page with a black 50x100 bar: inverted, it frames to 10x20."""
    page = np.full((400, 300, 3), 255, dtype=np.uint8)
    page[40:140, 200:250] = 0
    return Image.fromarray(page)


def framed_bar():
    # Scaled to 20 rows x 10 columns; centre of mass (9.5, 4.5) lands on (13.5, 13.5).
    expected = np.zeros((28, 28))
    expected[4:24, 9:19] = 1.0
    return expected


def png_with_declared_size(width, height):
    """A valid 1x1 PNG whose header claims another size: only the header is ever read."""
    raw = bytearray(encode_image(Image.new("L", (1, 1))))
    raw[16:24] = struct.pack(">II", width, height)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))
    return bytes(raw)


def noise_png_truncated():
    noise = np.random.default_rng(0).integers(0, 256, size=(64, 64), dtype=np.uint8)
    raw = encode_image(Image.fromarray(noise))
    return raw[: len(raw) // 2]


def pixel_grid(value=0):
    return [[value] * 28 for _ in range(28)]


def with_pixel(row, col, value):
    grid = pixel_grid()
    grid[row][col] = value
    return grid


# --- images ----------------------------------------------------------------------------


def test_light_digit_is_cropped_and_centred_exactly(light_square_png):
    grey = images.unit_image_from_bytes(light_square_png, 1)
    framed = images.frame_like_mnist(grey, [28, 28])
    np.testing.assert_array_equal(framed, framed_square())


def test_dark_digit_on_light_rgb_page_is_inverted_and_framed():
    grey = images.unit_image_from_bytes(encode_image(dark_bar_on_paper_rgb()), 1)
    assert grey.shape == (400, 300)
    assert images.border_mean(grey) == 1.0
    framed = images.frame_like_mnist(grey, [28, 28])
    np.testing.assert_array_equal(framed, framed_bar())


def test_jpeg_frames_like_png_up_to_codec_loss():
    jpeg = encode_image(dark_bar_on_paper_rgb(), "JPEG", quality=95)
    framed = images.frame_like_mnist(images.unit_image_from_bytes(jpeg, 1), [28, 28])
    ink = np.argwhere(framed > 0.5)
    assert (ink.min(axis=0).tolist(), ink.max(axis=0).tolist()) == ([4, 9], [23, 18])
    # JPEG is lossy: the tolerance is the codec's, not the framing's.
    assert np.abs(framed - framed_bar()).max() < 0.01


def test_transparent_canvas_drawing_counts_as_paper():
    canvas = np.zeros((60, 60, 4), dtype=np.uint8)  # transparent black everywhere
    canvas[10:30, 20:40] = (0, 0, 0, 255)  # an opaque black 20x20 stroke
    grey = images.unit_image_from_bytes(encode_image(Image.fromarray(canvas, "RGBA")), 1)
    np.testing.assert_array_equal(images.frame_like_mnist(grey, [28, 28]), framed_square())


def test_sixteen_bit_grey_is_scaled_not_clipped():
    deep = Image.fromarray(np.array([[0, 32768], [65535, 0]], dtype=np.uint16))
    grey = images.unit_image_from_bytes(encode_image(deep), 1)
    np.testing.assert_array_equal(grey, np.array([[0.0, 32768 / 65535], [1.0, 0.0]]))


@pytest.mark.parametrize("colour", [0, 255], ids=["black", "white"])
def test_blank_image_becomes_plain_background(colour, image_signature):
    body = encode_image(Image.new("L", (50, 50), colour))
    x = rest.decode_request(body, image_signature)
    np.testing.assert_array_equal(x, np.full((1, 32, 32), BACKGROUND, dtype=np.float32))


def test_image_request_is_padded_and_standardised(light_square_png, image_signature):
    x = rest.decode_request(light_square_png, image_signature)
    expected = np.full((1, 32, 32), BACKGROUND, dtype=np.float32)
    expected[0, 6:26, 6:26] = FULL_INK  # rows/cols 4..23 of the frame, plus the pad of 2
    assert x.dtype == np.float32
    np.testing.assert_array_equal(x, expected)


def test_paste_clips_at_the_canvas_edges():
    canvas = np.zeros((4, 4))
    images.paste_clipped(canvas, np.arange(1.0, 10.0).reshape(3, 3), -1, 2)
    np.testing.assert_array_equal(
        canvas, [[0, 0, 4, 5], [0, 0, 7, 8], [0, 0, 0, 0], [0, 0, 0, 0]]
    )


# --- JSON pixel arrays -----------------------------------------------------------------


def test_pixel_array_standardises_to_exact_values(image_signature):
    grid = pixel_grid()
    grid[3][4], grid[10][20] = 255, 51
    x = rest.decode_request(grid, image_signature)
    assert x.shape == (1, 32, 32)
    assert x[0, 0, 0] == BACKGROUND
    assert x[0, 2 + 3, 2 + 4] == FULL_INK
    assert x[0, 2 + 10, 2 + 20] == np.float32((0.2 - MEAN) / STD)
    assert int((x != BACKGROUND).sum()) == 2


@pytest.mark.parametrize(
    "wrap",
    [
        lambda g: g,
        lambda g: {"pixels": g},
        lambda g: json.dumps(g).encode(),
        lambda g: json.dumps({"pixels": g}),
    ],
    ids=["list", "pixels-object", "json-bytes", "json-text"],
)
def test_pixel_array_forms_decode_alike(wrap, image_signature):
    grid = with_pixel(7, 9, 128)
    expected = rest.decode_request(grid, image_signature)
    np.testing.assert_array_equal(rest.decode_request(wrap(grid), image_signature), expected)


# --- features --------------------------------------------------------------------------


def test_features_standardise_with_training_statistics(feature_row, features_signature):
    x = rest.decode_request(feature_row, features_signature)
    expected = np.array([(i + 1.0) / (1.0 + 0.5 * i) for i in range(30)], dtype=np.float32)
    assert x.dtype == np.float32
    np.testing.assert_array_equal(x, expected)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda row: list(row.values()),
        lambda row: {"features": row},
        lambda row: {"features": list(row.values())},
        lambda row: json.dumps(row).encode(),
        lambda row: json.dumps(dict(reversed(row.items()))),
    ],
    ids=["list", "features-object", "features-list", "json-bytes", "json-text-any-order"],
)
def test_feature_forms_decode_alike(wrap, feature_row, features_signature):
    expected = rest.decode_request(feature_row, features_signature)
    got = rest.decode_request(wrap(dict(feature_row)), features_signature)
    np.testing.assert_array_equal(got, expected)


# --- bad inputs ------------------------------------------------------------------------


IMAGE_BAD_INPUTS = [
    ("empty-bytes", b"", "empty body"),
    ("blank-text", " \n", "empty body"),
    ("none", None, "empty body"),
    ("binary-junk", b"\x00\x01\x02junk", "not a PNG or JPEG image and not JSON"),
    ("plain-text", b"hello", "not a PNG or JPEG image and not JSON"),
    (
        "broken-json",
        b'{"pixels": [1,}',
        "body is not valid JSON: Expecting value at line 1 column 15",
    ),
    (
        "short-array",
        [[0] * 28 for _ in range(27)],
        "pixel array has shape [27, 28], expected [28, 28]",
    ),
    (
        "two-channels",
        [pixel_grid(), pixel_grid()],
        "pixel array has shape [2, 28, 28], expected [28, 28]",
    ),
    ("ragged", pixel_grid()[:5] + [[0] * 27] + pixel_grid()[6:], "pixel array is ragged at [5]"),
    ("too-bright", with_pixel(3, 4, 256), "pixel at [3, 4] is 256, outside [0, 255]"),
    ("negative", with_pixel(0, 0, -1), "pixel at [0, 0] is -1, outside [0, 255]"),
    (
        "nan-token",
        json.dumps(with_pixel(0, 1, float("nan"))).encode(),
        "pixel at [0, 1] is not a finite number: NaN",
    ),
    (
        "parsed-infinity",
        with_pixel(5, 6, float("inf")),
        "pixel at [5, 6] is not a finite number: Infinity",
    ),
    ("boolean", with_pixel(2, 2, True), "pixel at [2, 2] is a boolean, not a number: true"),
    ("string", with_pixel(0, 0, "12"), 'pixel at [0, 0] is a string, not a number: "12"'),
    (
        "object",
        {"foo": 1},
        'expected a PNG or JPEG image, a pixel array or {"pixels": [...]}, got an object',
    ),
    (
        "number",
        7,
        'expected a PNG or JPEG image, a pixel array or {"pixels": [...]}, got a number',
    ),
    (
        "truncated-png",
        noise_png_truncated(),
        "PNG image could not be decoded (truncated or corrupt)",
    ),
    (
        "jpeg-magic-junk",
        b"\xff\xd8\xff" + b"junk" * 10,
        "JPEG image could not be decoded (truncated or corrupt)",
    ),
    (
        "huge-png",
        png_with_declared_size(5000, 5000),
        "image is 5000x5000 pixels, more than the limit of 16777216 pixels",
    ),
    (
        "bomb-png",
        png_with_declared_size(100_000, 100_000),
        "image is larger than the limit of 16777216 pixels",
    ),
]

def changed(row, **changes):
    """row with features set (underscores stand for spaces) or, given KeyError, removed."""
    row = dict(row)
    for key, value in changes.items():
        if value is KeyError:
            del row[key.replace("_", " ")]
        else:
            row[key.replace("_", " ")] = value
    return row


# Each body is built from the valid feature_row, so the cases name only what they break.
FEATURES_BAD_INPUTS = [
    ("29-numbers", lambda row: list(row.values())[:29], "expected 30 features, got 29"),
    ("batch-of-one", lambda row: [list(row.values())], "expected 30 features, got 1"),
    (
        "missing",
        lambda row: changed(row, mean_radius=KeyError),
        "expected 30 features, got 29: missing 'mean radius'",
    ),
    ("unknown", lambda row: changed(row, foo=1.0), "unknown features: 'foo'"),
    (
        "missing-and-unknown",
        lambda row: changed(row, mean_radius=KeyError, foo=1.0),
        "expected 30 features, got 30: missing 'mean radius'; unknown features: 'foo'",
    ),
    (
        "empty-object",
        lambda row: {},
        "expected 30 features, got 0: missing 'mean radius', 'mean texture', "
        "'mean perimeter', 'mean area', 'mean smoothness' and 25 more",
    ),
    (
        "nan-token",
        lambda row: json.dumps(changed(row, mean_area=float("nan"))).encode(),
        "value for 'mean area' is not a finite number: NaN",
    ),
    (
        "parsed-nan",
        lambda row: changed(row, mean_area=float("nan")),
        "value for 'mean area' is not a finite number: NaN",
    ),
    (
        "infinity-in-list",
        lambda row: json.dumps([1.0, float("inf")] + [1.0] * 28),
        "value for 'mean texture' is not a finite number: Infinity",
    ),
    (
        "minus-infinity",
        lambda row: changed(row, worst_area=float("-inf")),
        "value for 'worst area' is not a finite number: -Infinity",
    ),
    (
        "boolean",
        lambda row: changed(row, mean_radius=True),
        "value for 'mean radius' is a boolean, not a number: true",
    ),
    (
        "string",
        lambda row: changed(row, mean_radius="12.5"),
        "value for 'mean radius' is a string, not a number: \"12.5\"",
    ),
    (
        "null",
        lambda row: changed(row, mean_radius=None),
        "value for 'mean radius' is null, not a number: null",
    ),
    (
        "nested-value",
        lambda row: [[1]] + [1.0] * 29,
        "value for 'mean radius' is an array, not a number: [1]",
    ),
    (
        "image",
        lambda row: images.PNG_MAGIC + b"the rest of a PNG",
        "this model takes features, not an image",
    ),
    (
        "text",
        lambda row: "5",
        "expected a JSON object of 30 named features or a list of 30 numbers, got a number",
    ),
]


@pytest.mark.parametrize(
    "body, message", [case[1:] for case in IMAGE_BAD_INPUTS], ids=[c[0] for c in IMAGE_BAD_INPUTS]
)
def test_bad_image_request_names_the_problem(body, message, image_signature):
    with pytest.raises(BadInput) as caught:
        rest.decode_request(body, image_signature)
    assert str(caught.value) == message


@pytest.mark.parametrize(
    "make_body, message",
    [case[1:] for case in FEATURES_BAD_INPUTS],
    ids=[c[0] for c in FEATURES_BAD_INPUTS],
)
def test_bad_features_request_names_the_problem(
    make_body, message, feature_row, features_signature
):
    with pytest.raises(BadInput) as caught:
        rest.decode_request(make_body(feature_row), features_signature)
    assert str(caught.value) == message


@pytest.mark.parametrize(
    "request_, body",
    [({"data": b"x", "body": b"y"}, b"x"), ({"body": "y"}, "y"), (b"raw", b"raw")],
)
def test_request_body_prefers_form_field_data(request_, body, image_signature):
    assert rest.request_body(request_, image_signature) == body


def test_request_without_body_names_its_fields(image_signature):
    with pytest.raises(BadInput) as caught:
        rest.request_body({"file": b"x"}, image_signature)
    assert str(caught.value) == (
        "expected the request body or a form field named 'data', got fields: 'file'"
    )


# --- answers ---------------------------------------------------------------------------

DIGITS = {"kind": "multiclass", "labels": [str(d) for d in range(10)]}
CANCER = {"kind": "binary", "labels": ["malignant", "benign"]}


def test_multiclass_answer_ranks_top_k():
    row = np.array([0.05, 0.6, 0.1, 0.25, 0, 0, 0, 0, 0, 0], dtype=np.float32)
    p = [float(np.float32(v)) for v in (0.6, 0.25, 0.1)]
    assert answers.answers([row], DIGITS, top_k=3)[0] == {
        "label": "1",
        "probability": p[0],
        "top_k": [
            {"label": "1", "probability": p[0]},
            {"label": "3", "probability": p[1]},
            {"label": "2", "probability": p[2]},
        ],
    }


def test_multiclass_ties_keep_label_order_and_k_is_clamped():
    answer = answers.answers([np.full(10, 0.1, dtype=np.float32)], DIGITS, top_k=50)[0]
    assert [entry["label"] for entry in answer["top_k"]] == DIGITS["labels"]
    assert answer["label"] == "0"


@pytest.mark.parametrize(
    "positive, answer",
    [
        (0.8, {"label": "benign", "probability": float(np.float32(0.8))}),
        (0.5, {"label": "benign", "probability": 0.5}),
        (0.25, {"label": "malignant", "probability": 0.75}),
    ],
)
def test_binary_answer_is_the_predicted_label(positive, answer):
    row = np.array([positive], dtype=np.float32)
    assert answers.answers([row], CANCER)[0] == answer


def test_answer_refuses_non_finite_output():
    with pytest.raises(ValueError) as caught:
        answers.answers([np.array([np.nan], dtype=np.float32)], CANCER)
    assert str(caught.value) == "model returned a non-finite probability: [nan]"


def test_error_body():
    assert errors.error_body("empty body") == {"error": "empty body", "code": 400}


# --- signature -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda s: s.update(signature_version=1),
            "signature_version is 1, this handler reads version 2: export the model again",
        ),
        (lambda s: s["output"]["labels"].pop(), "output has 9 labels, expected 10"),
        (
            lambda s: s["inputs"][0].update(kind="audio"),
            "inputs[0].kind is 'audio', expected one of ('image', 'features', 'tensor')",
        ),
        (
            lambda s: s["inputs"][0].update(mean=[0.1, 0.2]),
            "inputs[0].mean is [0.1, 0.2]: expected 1 number(s), one per channel",
        ),
        (
            lambda s: s["inputs"][0].update(channels=3),
            "inputs[0].resize is 'mnist', which frames grey digits: channels must be 1",
        ),
        (
            lambda s: s["inputs"][0].update(pad=3),
            "inputs[0].shape [-1, 1, 32, 32] does not hold 1 channel(s) of 34x34 "
            "(size [28, 28] padded by 3)",
        ),
        (lambda s: s.update(inputs=[]), "signature.inputs must be a non-empty list, got []"),
        (
            lambda s: s["output"].update(kind="regression"),
            "output.names is None: expected 10 names, one per column of output.shape [-1, 10]",
        ),
    ],
    ids=["version", "labels", "kind", "mean", "channels", "shape", "no inputs", "names"],
)
def test_inconsistent_signature_is_refused(change, message, image_signature):
    change(image_signature)
    with pytest.raises(ValueError) as caught:
        signature_module.check_signature(image_signature)
    assert str(caught.value) == message


def test_fixture_signatures_are_consistent(image_signature, features_signature):
    signature_module.check_signature(image_signature)
    signature_module.check_signature(features_signature)
