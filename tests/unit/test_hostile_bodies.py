"""Bodies a client can send that used to get a 500 (or a silly answer): each is a 400 now,
with a short message that names the problem and quotes no more than an excerpt."""

import io
import json

import numpy as np
import pytest

from kiln.handlers import errors, rest


def reject(body, signature):
    with pytest.raises(errors.BadInput) as err:
        rest.decode_body(body, signature)
    return err.value


def test_an_integer_longer_than_python_parses_is_a_400(features_signature, feature_row):
    names = features_signature["inputs"][0]["names"]
    text = json.dumps(feature_row).replace(
        json.dumps(feature_row[names[0]]), "1" + "0" * 5000, 1)
    err = reject(text.encode(), features_signature)
    assert (str(err), err.reason) == (
        "body is not valid JSON: a number has more than 4300 digits", "undecodable")


@pytest.mark.parametrize("value", [1e40, -1e39, 3.5e38])
def test_a_feature_float32_cannot_hold_is_a_400(features_signature, feature_row, value):
    name = features_signature["inputs"][0]["names"][3]
    err = reject(json.dumps({**feature_row, name: value}).encode(), features_signature)
    assert err.reason == "bad_value"
    assert str(err) == (f"value for '{name}' is {value:g}, outside what a float32 model input "
                        "can hold (±3.40282e+38)")


def test_the_largest_float32_value_itself_still_fits(features_signature, feature_row):
    name = features_signature["inputs"][0]["names"][3]
    (rows,), _ = rest.decode_body(json.dumps({**feature_row, name: 1e30}).encode(),
                                  features_signature)
    assert np.isfinite(rows).all()


def npy_with_header(shape, descr="<f4", extra=b""):
    header = {"descr": descr, "fortran_order": False, "shape": shape}
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, header)
    return out.getvalue() + extra


def test_an_npy_that_declares_a_huge_shape_is_refused_before_allocating(image_signature):
    err = reject(npy_with_header((100000, 100000, 28)), image_signature)
    assert err.reason == "undecodable"
    assert str(err) == (".npy header declares shape [100000, 100000, 28] (280000000000 values), "
                        "but the body holds 0 bytes of data")


def test_an_npy_with_a_corrupt_header_is_a_400(image_signature):
    raw = npy_with_header((2, 28, 28)).replace(b"'shape'", b"'shap\x00'")
    err = reject(raw, image_signature)
    assert err.reason == "undecodable"
    assert str(err).startswith("not a readable .npy array")


def test_an_npy_whose_data_fits_its_header_still_decodes(image_signature):
    data = np.zeros((2, 28, 28), np.float32)
    rows, many = rest.decode_body(npy_with_header((2, 28, 28), extra=data.tobytes()),
                                  image_signature)
    assert many and rows[0].shape == (2, 1, 32, 32)


def test_error_messages_quote_an_excerpt_not_the_request(features_signature, feature_row):
    body = {**feature_row, "x" * 300_000: 1, "y" * 300_000: 2}
    err = reject(json.dumps(body).encode(), features_signature)
    assert len(json.dumps(errors.error_body(str(err)))) < 1024
    assert str(err).startswith("unknown features: 'xxxxxxxx")
    assert "..." in str(err)


def test_no_message_is_longer_than_the_limit():
    assert len(str(errors.BadInput("z" * 100_000))) == errors.MAX_MESSAGE_CHARS


def test_a_float32_tensor_value_past_its_range_is_a_400():
    spec = {"name": "x", "kind": "tensor", "dtype": "float32", "shape": [-1, 2]}
    signature = {"signature_version": 2, "name": "t", "inputs": [spec],
                 "output": {"name": "output", "kind": "raw", "dtype": "float32",
                            "shape": [-1, 2]}}
    err = reject(b"[1.0, 1e39]", signature)
    assert (str(err), err.reason) == (
        "value at [0, 1] (a float32 input) is 1e+39, above its maximum 3.40282e+38",
        "bad_value")


def png_declaring(width, height):
    """A tiny PNG whose header declares width x height (its data is one zlib'd row only)."""
    import struct
    import zlib

    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\x00" * (width + 1))) + chunk(b"IEND", b""))


def test_many_large_images_in_one_request_are_refused_from_their_headers(image_signature,
                                                                          monkeypatch):
    import base64

    from kiln.handlers import images

    def no_decoding(raw, channels):
        raise AssertionError("an image was decoded before the request's pixels were counted")

    monkeypatch.setattr(images, "unit_image_from_bytes", no_decoding)
    big = base64.b64encode(png_declaring(4096, 4096)).decode()
    body = json.dumps({"instances": [{"b64": big}] * 205}).encode()
    err = reject(body, image_signature)
    assert (str(err), err.reason) == (
        f"the request's images declare more than {images.MAX_REQUEST_PIXELS} pixels together, "
        "rows and columns counted (the limit per request): send fewer or smaller images",
        "too_large")


def test_one_image_at_the_limit_is_still_counted_in(image_signature):
    from kiln.handlers import images

    images.check_request_pixels([png_declaring(4096, 4096)])  # exactly the limit: fine
    with pytest.raises(errors.BadInput):
        images.check_request_pixels([png_declaring(4096, 4096), png_declaring(1, 1)])
