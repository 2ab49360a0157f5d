"""Several inputs in one request (JSON lists, {"instances"}, .npy): decoded as one block,
answered as a list in order; a bad instance names its index."""

import base64
import io
import json

import numpy as np
import pytest
from test_handler import loaded_handler, make_context, serve

from kiln.handlers import rest
from kiln.handlers.errors import BadInput


def grid(value=0, at=(3, 4)):
    g = [[0] * 28 for _ in range(28)]
    g[at[0]][at[1]] = value
    return g


def npy(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(array), allow_pickle=False)
    return buf.getvalue()


def test_single_inputs_are_not_lists(image_signature, features_signature, feature_row):
    (rows,), many = rest.decode_body(grid(200), image_signature)
    assert rows.shape == (1, 1, 32, 32) and many is False
    (rows,), many = rest.decode_body(list(feature_row.values()), features_signature)
    assert rows.shape == (1, 30) and many is False


@pytest.mark.parametrize("wrap", [lambda xs: xs, lambda xs: {"instances": xs},
                                  lambda xs: json.dumps(xs).encode()],
                         ids=["list", "instances", "json-bytes"])
def test_list_of_pixel_arrays(image_signature, wrap):
    images = [grid(255, (1, 1)), grid(128, (20, 7)), grid(0)]
    (rows,), many = rest.decode_body(wrap(images), image_signature)
    assert many is True and rows.shape == (3, 1, 32, 32) and rows.dtype == np.float32
    for row, image in zip(rows, images, strict=True):
        np.testing.assert_array_equal(row, rest.decode_request(image, image_signature))


def test_list_of_feature_rows_named_or_not(features_signature, feature_row):
    named = dict(feature_row)
    bare = [float(v) * 2 for v in feature_row.values()]
    (rows,), many = rest.decode_body([named, bare], features_signature)
    assert many is True and rows.shape == (2, 30)
    np.testing.assert_array_equal(rows[0], rest.decode_request(named, features_signature))
    np.testing.assert_array_equal(rows[1], rest.decode_request(bare, features_signature))


def test_base64_images_as_instances(image_signature, light_square_png):
    b64 = base64.b64encode(light_square_png).decode()
    (rows,), many = rest.decode_body({"instances": [{"b64": b64}, grid()]},
                                              image_signature)
    assert many is True and rows.shape == (2, 1, 32, 32)
    np.testing.assert_array_equal(
        rows[0], rest.decode_request(light_square_png, image_signature))


@pytest.mark.parametrize("body,message", [
    ([grid(), grid(300)], "instance 1: pixel at [3, 4] is 300, outside [0, 255]"),
    ({"instances": []}, "no instances to score: the list is empty"),
    ({"instances": 3}, '"instances" must be an array, got a number'),
    ({"instances": [{"b64": "%%%"}]}, 'instance 0: "b64" is not valid base64'),
    ([grid()] * 513, "513 instances in one request, more than 512"),
])
def test_bad_instances_name_their_index(image_signature, body, message):
    with pytest.raises(BadInput) as err:
        rest.decode_body(body, image_signature)
    assert str(err.value) == message


def test_npy_images_match_json_decoding(image_signature):
    images = np.zeros((3, 28, 28), dtype=np.uint8)
    images[0, 1, 1], images[1, 20, 7], images[2, 5, 5] = 255, 128, 3
    (rows,), many = rest.decode_body(npy(images), image_signature)
    assert many is True and rows.shape == (3, 1, 32, 32)
    expected = np.stack([rest.decode_request(im.tolist(), image_signature)
                         for im in images])
    np.testing.assert_array_equal(rows, expected)
    (one,), many = rest.decode_body(npy(images[0]), image_signature)
    assert many is False and one.shape == (1, 1, 32, 32)
    np.testing.assert_array_equal(one[0], expected[0])
    (channel,), many = rest.decode_body(npy(images[:, None]), image_signature)
    assert many is True
    np.testing.assert_array_equal(channel, expected)


def test_npy_features_match_json_decoding(features_signature, feature_row):
    values = np.array([list(feature_row.values())] * 2, dtype=np.float64)
    values[1] *= 3
    (rows,), many = rest.decode_body(npy(values), features_signature)
    assert many is True
    expected = np.stack([rest.decode_request(v.tolist(), features_signature)
                         for v in values])
    np.testing.assert_array_equal(rows, expected)


@pytest.mark.parametrize("array,message", [
    (np.zeros((2, 27, 28)), ".npy array has shape [2, 27, 28], expected [28, 28], "
                            "[N, 28, 28] or [N, 1, 28, 28]"),
    (np.full((28, 28), np.nan), "pixel at [0, 0, 0] is not a finite number: nan"),
    (np.full((28, 28), 256.0), "pixel at [0, 0, 0] is 256, outside [0, 255]"),
    (np.zeros((28, 28), dtype=bool), ".npy array has dtype bool, expected integers or floats"),
    (np.zeros((0, 28, 28)), "no instances to score: the array is empty"),
])
def test_bad_npy_images(image_signature, array, message):
    with pytest.raises(BadInput) as err:
        rest.decode_body(npy(array), image_signature)
    assert str(err.value) == message


def test_pickled_npy_is_refused(image_signature):
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(BadInput, match=r"holds Python objects \(pickles\): not accepted"):
        rest.decode_body(buf.getvalue(), image_signature)


def test_handler_answers_a_list_request_with_a_list_beside_single_requests(
        image_model_dir, image_signature):
    context = make_context(image_model_dir, "model.onnx")
    handler = loaded_handler(context)
    images = [grid(255, (1, 1)), grid(128, (20, 7))]
    single = serve(handler, context, [{"body": images[1]}])
    answers = serve(handler, context, [{"body": images[0]}, {"body": images},
                                       {"body": b"junk"}, {"body": npy(images)}])
    first, listed, bad, from_npy = answers
    assert json.loads(listed) == [json.loads(first), json.loads(single[0])]
    assert json.loads(from_npy) == json.loads(listed)
    assert context.get_response_status(2) == (400, "Bad Request")
    assert json.loads(bad)["error"] == "not a PNG or JPEG image and not JSON"
