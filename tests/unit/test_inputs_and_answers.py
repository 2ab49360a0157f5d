"""Signature v2 beyond the two original shapes: colour images and resize policies, tensor
inputs with a variable length, several inputs (REST, gRPC fields, OIP), every output kind."""

import io
import json
import warnings

import numpy as np
import pytest
from PIL import Image
from test_handler import loaded_handler, make_context
from ts.context import RequestProcessor

from kiln.handlers import answers, inputs, oip, rest, signature
from kiln.handlers.errors import BadInput

# --- a model with two tensor inputs ----------------------------------------------------

TEXT_SIGNATURE = {
    "signature_version": 2,
    "name": "tinytags",
    "inputs": [
        {"name": "input_ids", "kind": "tensor", "dtype": "int64", "shape": [-1, -1],
         "max_length": 8, "pad_value": 0, "min": 0, "max": 19},
        {"name": "attention_mask", "kind": "tensor", "dtype": "int64", "shape": [-1, -1],
         "max_length": 8, "pad_value": 0, "min": 0, "max": 1},
    ],
    "output": {"name": "probabilities", "kind": "multilabel", "dtype": "float32",
               "shape": [-1, 3], "labels": ["a", "b", "c"], "threshold": [0.5, 0.4, 0.6]},
}  # fmt: skip


def _text_model(torch):
    class Tags(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(20, 4)
            self.out = torch.nn.Linear(4, 3)
            with torch.no_grad():
                self.emb.weight.copy_(torch.sin(torch.arange(80.0)).reshape(20, 4))
                self.out.weight.copy_(torch.cos(torch.arange(12.0)).reshape(3, 4))
                self.out.bias.zero_()

        def forward(self, input_ids, attention_mask):
            mask = attention_mask.unsqueeze(-1).float()
            x = (self.emb(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            return torch.sigmoid(self.out(x))

    return Tags().eval()


@pytest.fixture(scope="session")
def text_model_dir(tmp_path_factory):
    import torch

    model = _text_model(torch)
    directory = tmp_path_factory.mktemp("models") / "tinytags"
    directory.mkdir()
    ids = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0]])
    batch, length = torch.export.Dim("batch"), torch.export.Dim("length", max=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.onnx.export(model, (ids, (ids > 0).long()), str(directory / "model.onnx"),
                          dynamo=True, external_data=False, verbose=False,
                          dynamic_shapes=({0: batch, 1: length}, {0: batch, 1: length}),
                          input_names=["input_ids", "attention_mask"],
                          output_names=["probabilities"])
    torch.jit.script(model).save(str(directory / "model.pt"))
    (directory / "signature.json").write_text(json.dumps(TEXT_SIGNATURE))
    return directory


def serve(handler, context, requests, protocols=None):
    protocols = protocols or [None] * len(requests)
    context.request_processor = [
        RequestProcessor({oip.PROTOCOL_HEADER: p} if p else {}) for p in protocols]
    return [json.loads(a) for a in handler.handle(requests, context)]


def close(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b, strict=True))
    return a == (pytest.approx(b, rel=1e-6) if isinstance(b, float) else b)


def statuses(context, n):
    return [context.get_response_status(i)[0] for i in range(n)]


def one(ids):
    return {"input_ids": ids, "attention_mask": [1] * len(ids)}


@pytest.mark.parametrize("serialized", ["model.onnx", "model.pt"])
def test_several_inputs_on_every_body_form(serialized, text_model_dir):
    context = make_context(text_model_dir, serialized)
    handler = loaded_handler(context)
    alone = [serve(handler, context, [{"body": one(ids)}])[0]
             for ids in ([1, 2, 3], [4, 5], [7])]
    assert alone[0]["probabilities"].keys() == {"a", "b", "c"}
    assert all(set(a) == {"labels", "probabilities"} for a in alone)
    requests = [
        {"body": json.dumps(one([1, 2, 3])).encode()},
        {"body": {"instances": [one([4, 5]), one([7])]}},  # padded to the longest
        {"data": [one([4, 5])]},
        # gRPC's input map, one entry per input name, each the JSON of that input
        {"input_ids": b"[7]", "attention_mask": b"[1]"},
    ]
    got = serve(handler, context, requests)
    assert statuses(context, 4) == [200] * 4
    for answer, expected in zip(got, [alone[0], alone[1:], [alone[1]], alone[2]], strict=True):
        assert close(answer, expected)  # padding may move the last float32 bit, no more
    # OIP: one named tensor per input, any order, the same batch size
    body = {"inputs": [
        {"name": "attention_mask", "shape": [2, 2], "datatype": "INT64", "data": [1, 1, 1, 0]},
        {"name": "input_ids", "shape": [2, 2], "datatype": "INT64", "data": [4, 5, 7, 0]},
    ]}  # fmt: skip
    (response,) = serve(handler, context, [{"body": body}], ["oip"])
    assert [o["name"] for o in response["outputs"]] == ["probabilities", "label"]
    assert response["outputs"][1]["data"] == [json.dumps(alone[1]["labels"]),
                                              json.dumps(alone[2]["labels"])]


@pytest.mark.parametrize(("body", "protocol", "message"), [
    (np.save, None, "a .npy body holds one array, and this model takes 2 inputs ('input_ids', "
     "'attention_mask'): send a JSON object keyed by input name"),
    ({"input_ids": [1]}, None, "expected the inputs 'input_ids', 'attention_mask': missing "
     "'attention_mask'"),
    ({"instances": [one([1]), {**one([1]), "x": 1}]}, None, "instance 1: expected the inputs "
     "'input_ids', 'attention_mask': unknown inputs: 'x'"),
    (one(list(range(9))), None, "input 'input_ids': array has shape [9], expected [L] with "
     "L <= 8"),
    (one([1, 20]), None, "input 'input_ids': value at [0, 1] is 20, above its maximum 19"),
    (one([1.5]), None, "input 'input_ids': int64 value at [0, 0] is 1.5, not a whole number "
     "in [-9223372036854775808, 9223372036854775807]"),
    ({"inputs": [{"name": "input_ids", "shape": [1, 1], "datatype": "INT64", "data": [1]}]},
     "oip", "\"inputs\" must hold one tensor per input ('input_ids', 'attention_mask'), "
     "got 1 tensors"),
    ({"inputs": [{"name": n, "shape": [k, 1], "datatype": "INT64", "data": [1] * k}
                 for n, k in (("input_ids", 1), ("attention_mask", 2))]},
     "oip", "input tensors have different batch sizes: {'input_ids': 1, 'attention_mask': 2}"),
])  # fmt: skip
def test_several_inputs_refusals_name_the_problem(text_model_dir, body, protocol, message):
    context = make_context(text_model_dir, "model.onnx")
    handler = loaded_handler(context)
    if body is np.save:
        buffer = io.BytesIO()
        np.save(buffer, np.zeros((2, 3)))
        body = buffer.getvalue()
    assert serve(handler, context, [{"body": body}], [protocol]) == [
        {"error": message, "code": 400}]


def test_variable_length_rows_are_padded_to_the_longest_in_the_batch():
    spec = TEXT_SIGNATURE["inputs"][0]
    parts = [rest.decode_body({"instances": [one([1, 2]), one([3])]}, TEXT_SIGNATURE)[0],
             rest.decode_body(one([4, 5, 6, 7]), TEXT_SIGNATURE)[0]]
    ids, mask = inputs.join(parts, TEXT_SIGNATURE)
    assert ids.dtype == np.int64 and mask.dtype == np.int64
    assert ids.tolist() == [[1, 2, 0, 0], [3, 0, 0, 0], [4, 5, 6, 7]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]]
    assert spec["pad_value"] == 0


def test_text_metadata_lists_every_input_with_its_dtype():
    assert oip.model_metadata(TEXT_SIGNATURE, "1.0") == {
        "name": "tinytags", "versions": ["1.0"], "platform": "kiln",
        "inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]},
                   {"name": "attention_mask", "datatype": "INT64", "shape": [-1, -1]}],
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]},
                    {"name": "label", "datatype": "BYTES", "shape": [-1]}],
    }  # fmt: skip


# --- colour images and resize policies -------------------------------------------------


def rgb_spec(resize="fit", size=(4, 6), pad=0):
    h, w = size
    return {"name": "image", "kind": "image", "dtype": "float32", "channels": 3,
            "shape": [-1, 3, h + 2 * pad, w + 2 * pad], "size": list(size), "resize": resize,
            "pad": pad, "pixel_max": 255, "mean": [0.5, 0.25, 0.0], "std": [0.5, 0.25, 1.0]}


def png(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def solid(h, w, colour=(255, 0, 51)):
    return np.broadcast_to(np.array(colour, np.uint8), (h, w, 3)).copy()


@pytest.mark.parametrize("resize", ["fit", "crop", "exact"])
def test_rgb_png_becomes_per_channel_standardised_planes(resize):
    spec = rgb_spec(resize, pad=1)
    signature.check_input(spec, "inputs[0]")
    row = inputs.row_from_image(png(solid(4, 6) if resize == "exact" else solid(40, 30)), spec)
    assert row.shape == (3, 6, 8) and row.dtype == np.float32
    inside = row[:, 1:-1, 1:-1]
    expected = [(1.0 - 0.5) / 0.5, (0.0 - 0.25) / 0.25, 51 / 255]
    np.testing.assert_allclose(inside.reshape(3, -1).mean(axis=1), expected, atol=1e-6)
    np.testing.assert_allclose(row[:, 0, 0], [(0 - 0.5) / 0.5, (0 - 0.25) / 0.25, 0.0])


def test_crop_keeps_the_centre_and_exact_refuses_another_size():
    spec = rgb_spec("crop", size=(2, 2))
    image = solid(2, 6, (0, 0, 0))
    image[:, 2:4] = 255  # a white centre between black sides
    row = inputs.row_from_image(png(image), spec)
    np.testing.assert_allclose(row[0], np.full((2, 2), 1.0), atol=1e-6)
    with pytest.raises(BadInput) as caught:
        inputs.row_from_image(png(solid(5, 6)), rgb_spec("exact"))
    assert (str(caught.value), caught.value.reason) == (
        "image is 6x5 pixels; this model takes exactly 6x4", "bad_shape")


def test_raw_rgb_pixels_from_json_and_npy_agree():
    spec = rgb_spec()
    pixels = np.arange(4 * 6 * 3).reshape(4, 6, 3) * 3
    sig = {"inputs": [spec]}
    from_json = rest.decode_request(pixels.tolist(), sig)
    buffer = io.BytesIO()
    np.save(buffer, pixels[np.newaxis])
    (from_npy,), many = rest.decode_body(buffer.getvalue(), sig)
    assert many and from_npy.shape == (1, 3, 4, 6)
    np.testing.assert_array_equal(from_npy[0], from_json)
    with pytest.raises(BadInput) as caught:
        rest.decode_request(pixels[..., :2].tolist(), sig)
    assert str(caught.value) == "pixel array has shape [4, 6, 2], expected [4, 6, 3]"


# --- features bounds -------------------------------------------------------------------


def test_features_outside_declared_bounds_are_refused(features_signature, feature_row):
    spec = features_signature["inputs"][0]
    spec["min"] = [0.0] + [None] * 29
    spec["max"] = [None] * 29 + [100.0]
    signature.check_signature(features_signature)
    with pytest.raises(BadInput) as caught:
        rest.decode_request({**feature_row, "mean radius": -1}, features_signature)
    assert str(caught.value) == "value for 'mean radius' is -1, below its minimum 0"
    with pytest.raises(BadInput) as caught:
        inputs.rows_from_raw(np.full((2, 30), 101.0), spec)
    assert str(caught.value) == "value for 'worst fractal dimension' is 101, above its maximum 100"


# --- answers ---------------------------------------------------------------------------


def test_multilabel_threshold_per_label():
    output = TEXT_SIGNATURE["output"]
    (answer,) = answers.answers(np.array([[0.5, 0.39, 0.61]], np.float32), output)
    assert answer["labels"] == ["a", "c"]
    assert answer["probabilities"] == {"a": 0.5, "b": float(np.float32(0.39)),
                                       "c": float(np.float32(0.61))}


def test_regression_values_with_units_and_raw_output():
    output = {"name": "values", "kind": "regression", "shape": [-1, 2],
              "names": ["price", "area"], "units": ["EUR", None]}
    assert answers.answers(np.array([[1.5, 2.0]]), output) == [
        {"values": {"price": 1.5, "area": 2.0}, "units": {"price": "EUR", "area": None}}]
    raw = {"name": "embedding", "kind": "raw", "shape": [-1, 2, 2]}
    assert answers.answers(np.ones((1, 2, 2)), raw) == [{"output": [[1.0, 1.0], [1.0, 1.0]]}]
    sig = {"name": "m", "inputs": [rgb_spec()], "output": output}
    assert oip.encode_response(np.array([[1.5, 2.0]]), sig) == {
        "model_name": "m",
        "outputs": [{"name": "values", "shape": [1, 2], "datatype": "FP32", "data": [1.5, 2.0]}]}
    assert oip.model_metadata(sig, "1.0")["outputs"] == [
        {"name": "values", "datatype": "FP32", "shape": [-1, 2]}]
    assert oip.model_metadata(sig, "1.0")["inputs"] == [
        {"name": "image", "datatype": "FP32", "shape": [-1, 4, 6, 3]}]
    with pytest.raises(ValueError, match="a regression output has no single label per row"):
        answers.best(np.array([[1.5, 2.0]]), output)


def test_binary_threshold_moves_the_label():
    output = {"kind": "binary", "labels": ["no", "yes"], "threshold": 0.8}
    assert answers.answers(np.array([[0.7], [0.8]], np.float32), output) == [
        {"label": "no", "probability": 1.0 - float(np.float32(0.7))},
        {"label": "yes", "probability": float(np.float32(0.8))}]


# --- the protocol comes from the route -------------------------------------------------


def test_an_infer_shaped_body_on_rest_is_a_kiln_body(image_model_dir):
    context = make_context(image_model_dir, "model.onnx")
    handler = loaded_handler(context)
    body = {"inputs": [{"name": "input", "shape": [1, 28, 28], "datatype": "FP32",
                        "data": [0] * 784}]}
    rest_answer, oip_answer = serve(handler, context, [{"body": body}, {"body": body}],
                                    [None, "oip"])
    assert rest_answer == {"error": 'expected a PNG or JPEG image, a pixel array or '
                                    '{"pixels": [...]}, got an object', "code": 400}
    assert [o["name"] for o in oip_answer["outputs"]] == ["probabilities", "label"]
