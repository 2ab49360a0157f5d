"""Open Inference Protocol tensors in and out of Kiln's handler (handlers/oip.py)."""

import json

import numpy as np
import pytest

from kiln.handlers import inputs, oip
from kiln.handlers.errors import BadInput


def infer(shape, data, datatype="FP32", name="input", **extra):
    return {"inputs": [{"name": name, "shape": shape, "datatype": datatype, "data": data}],
            **extra}


def grid(n=1):
    """n 28x28 images whose pixel (r, c) is (r * 28 + c + i) % 256 for image i."""
    return [[[(r * 28 + c + i) % 256 for c in range(28)] for r in range(28)] for i in range(n)]


def test_flat_and_nested_pixel_tensors_decode_like_a_npy_batch(image_signature):
    pixels = np.array(grid(2), dtype=np.float64)
    expected = inputs.rows_from_raw(pixels, image_signature["inputs"][0])
    flat = infer([2, 28, 28], pixels.ravel().astype(int).tolist(), "UINT8")
    nested = infer([2, 1, 28, 28], pixels[:, None].tolist())
    for body in (flat, nested, json.dumps(flat).encode(), json.dumps(nested)):
        (rows,), _ = oip.decode_infer(body, image_signature)
        np.testing.assert_array_equal(rows, expected)
    assert rows.shape == (2, 1, 32, 32)
    # Pixel (0, 0) of image 1 is 1: padded by 2, divided by 255, standardised.
    assert rows[1, 0, 2, 2] == np.float32((1 / 255 - 0.1307) / 0.3081)
    assert rows[0, 0, 0, 0] == np.float32((0 - 0.1307) / 0.3081)


def test_feature_tensor_standardises_with_training_statistics(features_signature):
    values = [float(2 * i) for i in range(30)]
    (rows,), _ = oip.decode_infer(infer([1, 30], values, "FP64"), features_signature)
    # mean i, std 1 + 0.5 i: (2i - i) / (1 + 0.5 i)
    expected = np.array([[i / (1 + 0.5 * i) for i in range(30)]], dtype=np.float32)
    np.testing.assert_array_equal(rows, expected)


@pytest.mark.parametrize("body", [
    b"\x89PNG\r\n\x1a\n...", "[[1, 2]]", {"instances": [[1] * 30]}, [[1] * 30],
    b'{"pixels": [[0]]}',
])  # fmt: skip
def test_kiln_bodies_on_the_oip_route_are_refused(body):
    with pytest.raises(BadInput) as caught:
        oip.infer_body(body)
    assert (str(caught.value), caught.value.reason) == (
        'an infer request is a JSON object with "inputs"', "bad_form")


@pytest.mark.parametrize(("body", "message"), [
    (infer([1, 30], [0] * 30, name="x"),
     "unknown input tensor \"x\": this model's input is 'input'"),
    (infer([1, 30], [0] * 30, "BYTES"), "input 'input' has datatype \"BYTES\"; expected one of "
     "FP16, FP32, FP64, UINT8, UINT16, UINT32, UINT64, INT8, INT16, INT32, INT64"),
    (infer([1, 29], [0] * 29), "input 'input' has shape [1, 29], expected [N, 30]"),
    (infer([30], [0] * 30), "input 'input' has shape [30], expected [N, 30]"),
    (infer([1, 30], [0] * 29), "input 'input' has 29 values, its shape [1, 30] needs 30"),
    (infer([1, 30], [0] * 29 + [float("nan")]),
     "input 'input' value at [29] is not a finite number: NaN"),
    (infer([1, 30], [0] * 29 + ["7"]),
     "input 'input' value at [29] is a string, not a number: \"7\""),
    (infer([1, 30], [0] * 29 + [1.5], "INT32"),
     "input 'input' (INT32) value at [0, 29] is 1.5, not a whole number in "
     "[-2147483648, 2147483647]"),
    (infer([0, 30], []), "input 'input': no instances to score: the array is empty"),
    (infer([1, 30], [0] * 30, id=7), '"id" must be a string, got 7'),
    (infer([1, 30], [0] * 30, outputs=[{"name": "logits"}]),
     "unknown output(s) 'logits': this model has 'probabilities', 'label'"),
    (infer([1, 30], [0] * 30, extra=1), "unknown field(s) in the infer request: 'extra'; "
     "expected 'id', 'parameters', 'inputs', 'outputs', 'model_name', 'model_version'"),
    (infer([1, 30], [0] * 30, model_name="tinycancer", model_version="1", extra=1),
     "unknown field(s) in the infer request: 'extra'; expected 'id', 'parameters', 'inputs', "
     "'outputs', 'model_name', 'model_version'"),
    ({"inputs": []}, "\"inputs\" must hold exactly one tensor ('input'), got 0 tensors"),
])  # fmt: skip
def test_bad_feature_requests_name_what_is_wrong(body, message, features_signature):
    with pytest.raises(BadInput) as err:
        oip.decode_infer(body, features_signature)
    assert str(err.value) == message


# What KServe's SDK sends (InferRequest.to_rest): an id and the model's name beside the inputs.
@pytest.mark.parametrize("named", [
    {"model_name": "tinycancer"}, {"model_name": "tinycancer", "model_version": "3"},
    {"model_version": "3"}, {"model_version": ""}, {"model_name": None},
])  # fmt: skip
def test_an_infer_body_may_name_the_model_and_version_it_reached(named, features_signature):
    values = [float(i) for i in range(30)]
    (expected,), _ = oip.decode_infer(infer([1, 30], values, "FP64"), features_signature,
                                      version="3")
    body = infer([1, 30], values, "FP64", id="a1", **named)
    (rows,), encode = oip.decode_infer(body, features_signature, version="3")
    np.testing.assert_array_equal(rows, expected)
    answer = encode(np.array([[0.25]], dtype=np.float32))
    assert (answer["model_name"], answer["model_version"], answer["id"]) == (
        "tinycancer", "3", "a1")


@pytest.mark.parametrize(("named", "reached", "message"), [
    ({"model_name": "lenet"}, None,
     '"model_name" in the infer request is "lenet", but it reached model "tinycancer"'),
    ({"model_name": "tinycancer", "model_version": "2"}, None,
     '"model_version" in the infer request is "2", but version "3" of "tinycancer" answers '
     'it; pin a version in the path: /v2/models/NAME/versions/VERSION/infer'),
    ({"model_name": "tinycancer"}, {"model_name": "cancer", "model_version": "3"},
     '"model_name" in the infer request is "tinycancer", but it reached model "cancer"'),
    ({"model_name": 7}, None, '"model_name" must be a string, got 7'),
    ({"model_version": 3}, None, '"model_version" must be a string, got 3'),
])  # fmt: skip
def test_an_infer_body_naming_another_model_or_version_is_refused(named, reached, message,
                                                                   features_signature):
    with pytest.raises(BadInput) as err:
        oip.decode_infer(infer([1, 30], [0] * 30, **named), features_signature, version="3",
                         reached=reached)
    assert (str(err.value), err.value.status, err.value.reason) == (message, 400, "bad_form")


def test_a_version_left_unchecked_takes_any_the_body_names(features_signature):
    # A shadow's copy: scored by a version the client did not pick (handler.py).
    body = infer([1, 30], [0] * 30, model_name="tinycancer", model_version="1")
    (rows,), _ = oip.decode_infer(body, features_signature, version="2",
                                  reached={"model_name": "tinycancer", "model_version": None})
    assert rows.shape == (1, 30)


@pytest.mark.parametrize(("body", "message"), [
    (infer([1, 28, 28], [300] + [0] * 783, "UINT16"),
     "input 'input': pixel at [0, 0, 0] is 300, outside [0, 255]"),
    (infer([1, 28, 28], [256] + [0] * 783, "UINT8"),
     "input 'input' (UINT8) value at [0, 0, 0] is 256, not a whole number in [0, 255]"),
    (infer([1, 2, 28, 28], [0] * 1568), "input 'input' has shape [1, 2, 28, 28], "
     "expected [N, 28, 28] or [N, 1, 28, 28]"),
    (infer([1, 28, 28], [[[0] * 28] * 27 + [[0] * 27]]),
     "input 'input' value array is ragged at [0, 27]"),
    # 28 rows in one list for [1, 28, 28]: the batch dimension left out of the nesting.
    (infer([1, 28, 28], [[0] * 28] * 28), "input 'input' data must be flat or nested as "
     "its shape [1, 28, 28], got an array nested as [28, 28]"),
    (infer([1, 28, 28], [[[0] * 28] * 28] * 2), "input 'input' data must be flat or nested "
     "as its shape [1, 28, 28], got an array nested as [2, 28, 28]"),
    (infer([1, 28, 28], [[0] * 784]), "input 'input' data must be flat or nested as its "
     "shape [1, 28, 28], got an array nested as [1, 784]"),
])  # fmt: skip
def test_bad_pixel_requests_name_what_is_wrong(body, message, image_signature):
    with pytest.raises(BadInput) as err:
        oip.decode_infer(body, image_signature)
    assert str(err.value) == message


def test_multiclass_answer_has_probabilities_and_labels(image_signature):
    _, encode = oip.decode_infer(infer([2, 28, 28], grid(2), id="42"), image_signature)
    probabilities = np.zeros((2, 10), dtype=np.float32)
    probabilities[0, 7], probabilities[0, 1] = 0.75, 0.25
    probabilities[1, 3] = 1.0
    assert encode(probabilities) == {
        "model_name": "tinydigits",
        "id": "42",
        "outputs": [
            {"name": "probabilities", "shape": [2, 10], "datatype": "FP32",
             "data": [0, 0.25, 0, 0, 0, 0, 0, 0.75, 0, 0, 0, 0, 0, 1.0, 0, 0, 0, 0, 0, 0]},
            {"name": "label", "shape": [2], "datatype": "BYTES", "data": ["7", "3"]},
        ],
    }  # fmt: skip


def test_binary_answer_gives_both_labels_probabilities(features_signature):
    body = infer([2, 30], [0] * 60, outputs=[{"name": "label"}, {"name": "probabilities"}])
    _, encode = oip.decode_infer(body, features_signature)
    assert encode(np.array([[0.25], [0.5]], dtype=np.float32)) == {
        "model_name": "tinycancer",
        "outputs": [
            {"name": "label", "shape": [2], "datatype": "BYTES", "data": ["malignant", "benign"]},
            {"name": "probabilities", "shape": [2, 2], "datatype": "FP32",
             "data": [0.75, 0.25, 0.5, 0.5]},
        ],
    }  # fmt: skip


def test_a_non_finite_model_output_is_a_server_error(features_signature):
    with pytest.raises(ValueError, match="non-finite probability"):
        oip.encode_response(np.array([[np.nan]]), features_signature)


def test_metadata_describes_raw_inputs_before_preprocess(image_signature, features_signature):
    assert oip.model_metadata(image_signature, "1.0") == {
        "name": "tinydigits", "versions": ["1.0"], "platform": "kiln",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 28, 28]}],
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
                    {"name": "label", "datatype": "BYTES", "shape": [-1]}],
    }  # fmt: skip
    metadata = oip.model_metadata(features_signature, "1.0")
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 30]}]
    assert metadata["outputs"][0] == {"name": "probabilities", "datatype": "FP32",
                                      "shape": [-1, 2]}


def binary(shape, values, datatype, name="input"):
    """(body, JSON header length) of the binary tensor data extension, as the plugin forwards
    it: the JSON header, then the tensor's little-endian bytes."""
    data = np.asarray(values, dtype=oip.BINARY_DTYPES[datatype]).tobytes()
    header = json.dumps({"inputs": [{"name": name, "shape": shape, "datatype": datatype,
                                     "parameters": {oip.BINARY_SIZE: len(data)}}]}).encode()
    return bytearray(header + data), str(len(header))


@pytest.mark.parametrize("datatype", ["FP16", "FP32", "FP64", "UINT8", "INT64"])
def test_binary_tensors_decode_as_their_json_form(datatype, image_signature):
    pixels = np.array(grid(2), dtype=oip.BINARY_DTYPES[datatype])
    body, length = binary([2, 28, 28], pixels.ravel(), datatype)
    (rows,), _ = oip.decode_infer(body, image_signature, json_length=length)
    (expected,), _ = oip.decode_infer(
        infer([2, 28, 28], pixels.astype(np.float64).ravel().tolist(), datatype), image_signature)
    np.testing.assert_array_equal(rows, expected)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_a_non_finite_binary_value_is_refused_as_its_json_form(value, features_signature):
    values = np.zeros(30)
    values[29] = value
    body, length = binary([1, 30], values, "FP32")
    with pytest.raises(BadInput) as binary_error:
        oip.decode_infer(body, features_signature, json_length=length)
    text = json.dumps(infer([1, 30], values.tolist()))  # NaN and Infinity tokens, as Java wrote
    with pytest.raises(BadInput) as json_error:
        oip.decode_infer(text, features_signature)
    assert str(binary_error.value) == str(json_error.value)
    assert str(binary_error.value).startswith("input 'input' value at [29] is not a finite")


@pytest.mark.parametrize("length", ["x", "-1", "99999"])
def test_binary_data_without_its_framing_is_a_400(length, features_signature):
    body, _ = binary([1, 30], np.zeros(30), "FP32")
    with pytest.raises(BadInput) as error:
        oip.decode_infer(body, features_signature, json_length=length)
    assert (str(error.value), error.value.status) == ("binary tensor data without its framing",
                                                      400)
