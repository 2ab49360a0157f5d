"""Every bound of handlers/limits.py: a request over it is refused with 413 or 400, naming the
bound and the number, from sizes, headers and shapes alone (nothing is parsed or decoded
first); a server-side batch admits requests in order and refuses only those that would take
it past its own bounds; a non-finite model output is that request's 400."""

import base64
import functools
import io
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image
from ts.context import Context, RequestProcessor

from kiln import declaration
from kiln.handlers import errors, images, limits, oip, rest
from kiln.handlers import handler as kiln_handler
from kiln.handlers.signature import check_signature
from kiln.training import export

OUTPUT = {"name": "probabilities", "dtype": "float32", "shape": [-1, 2], "kind": "multiclass",
          "labels": ["a", "b"], "top_k": 1}


def signature_of(*specs):
    signature = {"signature_version": 2, "name": "limits", "inputs": list(specs),
                 "output": OUTPUT}
    check_signature(signature)
    return signature


def tensor_spec(name="x", shape=(-1, 4096), **extra):
    return {"name": name, "kind": "tensor", "dtype": "float32", "shape": list(shape), **extra}


def image_spec(name="input"):
    return {"name": name, "kind": "image", "dtype": "float32", "shape": [-1, 1, 28, 28],
            "channels": 1, "size": [28, 28], "resize": "fit", "pad": 0, "pixel_max": 255,
            "mean": [0.0], "std": [1.0]}


WIDE = signature_of(tensor_spec())  # 4,096 values a row
VARIABLE = signature_of(tensor_spec(shape=(-1, -1), max_length=4096, pad_value=0))


def refused(body, signature):
    with pytest.raises(errors.BadInput) as caught:
        rest.decode_body(body, signature)
    return caught.value


def npy(array):
    out = io.BytesIO()
    np.save(out, array)
    return out.getvalue()


@functools.lru_cache
def blank_png(width, height):
    """A black PNG of width x height (4096 x 4096 is 15 KiB)."""
    out = io.BytesIO()
    Image.new("L", (width, height)).save(out, "PNG")
    return out.getvalue()


@pytest.fixture
def no_json_parsing(monkeypatch):
    def parse(*args, **kwargs):
        raise AssertionError("json.loads ran on a body over a bound")

    monkeypatch.setattr(rest.json, "loads", parse)


@pytest.fixture
def no_image_headers(monkeypatch):
    def read(raw):
        raise AssertionError("an image header was read for a request over a bound")

    monkeypatch.setattr(images, "declared_pixels", read)


# --- JSON text ----------------------------------------------------------------------------


def test_a_hundred_thousand_nested_arrays_are_refused_before_parsing(image_signature,
                                                                      no_json_parsing):
    err = refused(b"[" * 100_000, image_signature)
    assert (str(err), err.status) == (
        "JSON nested 100000 levels deep, more than the limit of 32", 400)


def test_nesting_json_loads_would_take_is_refused_too(features_signature, feature_row):
    deepest = signature_of(tensor_spec(shape=(-1, *[1] * 31)))
    (rows,), _ = rest.decode_body(("[" * 32 + "0" + "]" * 32).encode(), deepest)
    assert rows.shape == (1, *[1] * 31)  # 32 levels: at the bound
    name = features_signature["inputs"][0]["names"][0]
    strings = json.dumps({**feature_row, name: "[]" * 40}).encode()  # no nesting at all
    assert str(refused(strings, features_signature)).startswith(
        f"value for '{name}' is a string, not a number")
    err = refused(b"[" * 33 + b"0" + b"]" * 33, features_signature)
    assert (str(err), err.status) == ("JSON nested 33 levels deep, more than the limit of 32",
                                      400)


def test_too_many_arrays_are_refused_before_parsing(features_signature, no_json_parsing):
    body = ("[" + ",".join(["[0]"] * 70_000) + "]").encode()
    err = refused(body, features_signature)
    assert (str(err), err.status) == (
        "JSON body has 70001 arrays and objects, more than the limit of 65536: send images "
        "as PNG or arrays as .npy", 413)


@pytest.mark.parametrize("literal", ["1" * 100_000 + ".5", "0." + "1" * 5000,
                                     "1e" + "9" * 4301])
def test_a_float_literal_of_thousands_of_digits_is_refused_before_parsing(
        features_signature, no_json_parsing, literal):
    err = refused(f"[{literal}, 1]".encode(), features_signature)
    assert (str(err), err.status) == (
        "body is not valid JSON: a number has more than 4300 digits", 400)


def test_text_bodies_are_checked_like_bytes(features_signature, no_json_parsing):
    err = refused("[" * 40, features_signature)
    assert str(err) == "JSON nested 40 levels deep, more than the limit of 32"


# --- one request ----------------------------------------------------------------------------


def test_too_many_instances_is_a_413(image_signature):
    (rows,), many = rest.decode_body({"instances": [[[0] * 28] * 28] * 512}, image_signature)
    assert many and rows.shape == (512, 1, 32, 32)
    err = refused({"instances": [[[0] * 28] * 28] * 513}, image_signature)
    assert (str(err), err.reason, err.status) == (
        "513 instances in one request, more than 512", "too_large", 413)


def test_too_many_images_are_refused_before_any_header_is_read(no_image_headers):
    two_images = signature_of(image_spec("a"), image_spec("b"))
    b64 = base64.b64encode(blank_png(28, 28)).decode()
    body = {"instances": [{"a": {"b64": b64}, "b": {"b64": b64}}] * 300}
    err = refused(body, two_images)
    assert (str(err), err.status) == ("600 images in one request, more than the limit of 512",
                                      413)


def test_the_request_pixel_bound_is_a_413(image_signature, monkeypatch):
    monkeypatch.setattr(images, "unit_image_from_bytes", pytest.fail)
    b64 = base64.b64encode(blank_png(4096, 4096)).decode()
    err = refused({"instances": [{"b64": b64}] * 2}, image_signature)
    assert err.status == 413
    assert str(err).startswith("the request's images declare more than 16875520 pixels")


def test_a_b64_string_over_its_bound_is_refused_before_base64_decodes_it(image_signature,
                                                                         monkeypatch):
    monkeypatch.setattr(rest.base64, "b64decode", pytest.fail)
    text = "A" * (limits.MAX_B64_CHARS + 4)
    err = refused({"instances": [{"b64": text}]}, image_signature)
    assert (str(err), err.status) == (
        'instance 0: "b64" image of 4194308 characters, more than the limit of 4194304', 413)


def test_an_npy_body_over_the_value_bound_is_refused_before_conversion(monkeypatch):
    (rows,), many = rest.decode_body(npy(np.zeros((256, 4096), np.float32)), WIDE)
    assert many and rows.shape == (256, 4096)  # exactly 1,048,576 values: at the bound
    monkeypatch.setattr(rest.inputs, "rows_from_raw", pytest.fail)
    err = refused(npy(np.zeros((300, 4096), np.float32)), WIDE)
    assert (str(err), err.status) == (
        "1228800 input values in one request, more than the limit of 1048576: send fewer rows",
        413)


def test_variable_lengths_count_padded_to_the_request_longest(monkeypatch):
    # A row past max_length is a shape error (400), not counted as a 413.
    err = refused({"instances": [[1.0] * 5000]}, VARIABLE)
    assert (str(err), err.status) == (
        "instance 0: array has shape [5000], expected [L] with L <= 4096", 400)
    monkeypatch.setattr(rest.inputs, "row_from_json", pytest.fail)
    rows = [[1.0] * 4000] + [[1.0]] * 299  # 4,299 values sent, 1,200,000 once padded
    err = refused({"instances": rows}, VARIABLE)
    assert (str(err), err.status) == (
        "1200000 input values in one request, more than the limit of 1048576: send fewer rows",
        413)


# --- the Open Inference Protocol --------------------------------------------------------------


def infer(shape, data=(), **extra):
    return {"inputs": [{"name": "input", "shape": shape, "datatype": "FP32",
                        "data": list(data)}], **extra}


def test_an_oip_tensor_is_counted_from_its_shape_before_its_data(image_signature):
    with pytest.raises(errors.BadInput) as caught:
        oip.decode_infer(infer([100_000, 28, 28]), image_signature)
    assert (str(caught.value), caught.value.status) == (
        "100000 instances in one request, more than 512", 413)
    wide = signature_of(tensor_spec("input"))
    with pytest.raises(errors.BadInput) as caught:
        oip.decode_infer(infer([300, 4096]), wide)
    assert (str(caught.value), caught.value.status) == (
        "1228800 input values in one request, more than the limit of 1048576: send fewer rows",
        413)


def test_an_oip_id_over_its_bound_is_a_413(image_signature):
    with pytest.raises(errors.BadInput) as caught:
        oip.decode_infer(infer([1, 28, 28], [0] * 784, id="x" * 300), image_signature)
    assert (str(caught.value), caught.value.status) == (
        '"id" of 300 characters, more than the limit of 256', 413)


# --- a server-side batch through the handler -------------------------------------------------


class ScoresRows:
    """A backend that answers [0.25, 0.75] per row, or NaN for rows whose first value is -1."""

    description = "test"

    def run(self, batch):
        first = batch[0].reshape(len(batch[0]), -1)[:, 0]
        out = np.tile(np.float32([0.25, 0.75]), (len(first), 1))
        out[first == -1] = np.nan
        return out


def handler_for(signature, tmp_path):
    handler = kiln_handler.KilnHandler()
    handler.signature, handler.backend, handler.initialized = signature, ScoresRows(), True
    context = Context("limits", str(tmp_path), {"model": {}}, 8, None, "0.12.0",
                      limit_max_image_pixels=True, metrics=None, model_yaml_config={})
    return handler, context


def serve(handler, context, bodies):
    context.request_processor = [RequestProcessor({}) for _ in bodies]
    out = handler.handle([{"body": body} for body in bodies], context)
    return [context.get_response_status(i)[0] for i in range(len(bodies))], [
        json.loads(a) for a in out]


def test_a_batch_refuses_only_the_requests_past_its_value_bound(tmp_path):
    handler, context = handler_for(WIDE, tmp_path)
    big = npy(np.zeros((200, 4096), np.float32))  # 819,200 values, under the request bound
    small = npy(np.zeros((1, 4096), np.float32))
    statuses, answers = serve(handler, context, [big] * 6 + [small])
    assert statuses == [200] * 5 + [503, 200]
    assert context.get_response_headers(5)["Retry-After"] == "1"  # another batch will take it
    assert answers[5] == {"code": 503, "error": (
        "this server-side batch would hold 4915200 input values with this request, more than "
        "the limit of 4194304 per batch: send it again, or with fewer rows")}
    assert answers[6] == [{"label": "b", "probability": 0.75,
                           "top_k": [{"label": "b", "probability": 0.75}]}]


def test_a_batch_refuses_only_the_requests_past_its_pixel_bound(tmp_path, monkeypatch):
    # Decoding takes no time on this clock: the worker's share (below) never binds here.
    monkeypatch.setattr(limits, "monotonic", lambda: 0.0, raising=False)
    decoded = []
    monkeypatch.setattr(images, "image_row_from_bytes",
                        lambda raw, spec: decoded.append(raw) or np.zeros((1, 28, 28)))
    handler, context = handler_for(signature_of(image_spec()), tmp_path)
    large, small = blank_png(4096, 3000), blank_png(28, 28)
    statuses, answers = serve(handler, context, [large, large, large, small])
    assert statuses == [200, 200, 503, 200]
    assert answers[2]["error"] == (
        "this server-side batch would decode 37116168 pixels with this request, more than the "
        "limit of 33751040 per batch: send it again")
    assert decoded == [large, large, small]  # the refused image was never decoded


# --- a worker's share of time for large images ------------------------------------------------
COSTLY = 1_048_577  # one pixel over limits.CHEAP_REQUEST_PIXELS
DIGIT = blank_png(28, 28)
ANSWER = {"label": "b", "probability": 0.75, "top_k": [{"label": "b", "probability": 0.75}]}


def busy(pixels):
    return {"code": 503, "error": f"this request's images cost {pixels} pixels, and this "
            "worker has given its share of time to such large images: send it again"}


class Clock:
    """Seconds that pass only when a test says so."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def decode(share, clock, pixels, seconds):
    """Admits a request and settles it after `seconds` of decoding."""
    share.admit(pixels)
    clock.now += seconds
    share.settle()


def test_a_worker_gives_large_images_half_its_time_and_refusals_cost_nothing():
    clock = Clock()
    share = limits.DecodeShare(clock)
    decode(share, clock, COSTLY, 1.0)  # 0.1 s saved up, 0.5 earned while it ran: 0.4 owed
    with pytest.raises(errors.BadInput) as caught:
        share.admit(COSTLY)
    assert {"code": caught.value.status, "error": str(caught.value)} == busy(COSTLY)
    clock.now += 0.75
    with pytest.raises(errors.BadInput):  # 0.025 still owed, and the refusal took nothing
        share.admit(COSTLY)
    clock.now += 0.1  # 0.025 held
    decode(share, clock, COSTLY, 0.1)  # 0.05 earned while it ran: 0.025 owed
    clock.now += 0.04
    with pytest.raises(errors.BadInput):
        share.admit(limits.MAX_REQUEST_PIXELS)
    clock.now += 100  # an idle worker saves up COSTLY_CREDIT_S, no more
    decode(share, clock, COSTLY, 0.4)
    with pytest.raises(errors.BadInput):
        share.admit(COSTLY)


def test_requests_of_small_images_are_never_counted_nor_refused():
    assert 512 * limits.image_cost(28, 28) == 745_472 < limits.CHEAP_REQUEST_PIXELS == COSTLY - 1
    clock = Clock()
    share = limits.DecodeShare(clock)
    decode(share, clock, COSTLY, 1.0)  # 0.4 s owed
    for _ in range(1000):
        decode(share, clock, limits.CHEAP_REQUEST_PIXELS, 0.0)
    decode(share, clock, limits.CHEAP_REQUEST_PIXELS, 1.0)  # its second earned 0.5, took none
    share.admit(COSTLY)


def test_a_worker_refuses_large_images_past_its_share_and_answers_their_neighbours(
        tmp_path, monkeypatch):
    """Issue 16: clients sending the costliest images kept lenet's worker decoding while a
    digit queued behind them went unanswered for seconds."""
    clock = Clock()
    monkeypatch.setattr(limits, "monotonic", clock, raising=False)
    decoded = []

    def image_row_from_bytes(raw, spec):
        decoded.append(raw)
        clock.now += 0.5 if len(raw) > len(DIGIT) else 0.0  # a digit's time is not counted
        return np.zeros((1, 28, 28))

    monkeypatch.setattr(images, "image_row_from_bytes", image_row_from_bytes)
    handler, context = handler_for(signature_of(image_spec()), tmp_path)
    square, half = blank_png(4096, 4096), blank_png(2048, 2048)
    digits = json.dumps({"instances": [{"b64": base64.b64encode(DIGIT).decode()}] * 512})
    statuses, answers = serve(handler, context, [DIGIT, square, half, digits, DIGIT])
    assert statuses == [200, 200, 503, 200, 200]
    assert context.get_response_headers(2)["Retry-After"] == "1"
    assert answers[2] == busy(4_243_456)  # within the batch's bounds, past the worker's share
    assert answers[0] == answers[4] == ANSWER and answers[3] == [ANSWER] * 512
    assert decoded == [DIGIT, square] + [DIGIT] * 513  # the refused image was never decoded
    # Across batches: the square left 0.15 s owed (0.1 saved, 0.25 earned while it ran).
    clock.now += 0.2
    assert serve(handler, context, [square, DIGIT])[0] == [503, 200]
    clock.now += 0.2
    assert serve(handler, context, [half, DIGIT])[0] == [200, 200]


def test_a_refused_request_gives_its_share_of_the_batch_back(tmp_path):
    handler, context = handler_for(WIDE, tmp_path)
    big = npy(np.zeros((200, 4096), np.float32))
    bad = npy(np.full((200, 4096), np.nan, np.float32))  # admitted, then fails to decode
    statuses, _ = serve(handler, context, [bad] * 6 + [big] * 6)
    assert statuses == [400] * 6 + [200] * 5 + [503]


def test_a_non_finite_model_output_is_that_requests_400(tmp_path):
    handler, context = handler_for(WIDE, tmp_path)
    row = [0.0] * 4096
    statuses, answers = serve(handler, context, [
        json.dumps(row), json.dumps([-1.0] + row[1:]),
        json.dumps({"instances": [row, [-1.0] + row[1:]]}), json.dumps(row)])
    assert statuses == [200, 400, 400, 200]
    message = ("the model's output for this input is not a finite number (NaN or infinity), so "
               "it has no answer: check the input is within the ranges the model was trained on")
    assert answers[1] == {"code": 400, "error": message}
    assert answers[2] == {"code": 400, "error": "instance 1: " + message}
    assert answers[0] == answers[3] == {"label": "b", "probability": 0.75,
                                        "top_k": [{"label": "b", "probability": 0.75}]}


def test_initialize_makes_torchserve_hand_over_json_unparsed(image_model_dir, monkeypatch):
    monkeypatch.delenv(kiln_handler.DECODE_INPUT_ENV, raising=False)
    context = Context("tinydigits", str(image_model_dir), {"model": {
        "modelName": "tinydigits", "serializedFile": "model.onnx", "handler": "handler.py",
        "modelVersion": "1.0"}}, 4, None, "0.12.0", limit_max_image_pixels=True,
        metrics=None, model_yaml_config={})
    kiln_handler.KilnHandler().initialize(context)
    assert os.environ[kiln_handler.DECODE_INPUT_ENV] == "false"


# --- declared feature ranges ----------------------------------------------------------------

MODEL = """
from torch import nn


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(x)
"""
DECLARATION = """
[model]
file = "tiny.py"
[weights]
state_dict = "tiny.pt"
[[inputs]]
name = "input"
kind = "features"
names = ["sepal_length", "sepal_width", "petal_length"]
ranges = {sepal_length = [0, 10], petal_length = [-inf, 7.5]}
[output]
kind = "multiclass"
activation = "softmax"
labels = ["a", "b"]
[[examples]]
value = {sepal_length = 5.1, sepal_width = 3.5, petal_length = 1.4}
"""


def declared(tmp_path, text=DECLARATION):
    folder = tmp_path / "models"
    folder.mkdir(exist_ok=True)
    (folder / "tiny.py").write_text(MODEL)
    (folder / "tiny.toml").write_text(text)
    namespace = {}
    exec(MODEL, namespace)
    torch.manual_seed(0)
    torch.save(namespace["Tiny"]().state_dict(), folder / "tiny.pt")
    return folder


def test_declared_ranges_reach_the_signature_and_the_handler_enforces_them(tmp_path):
    folder = declared(tmp_path)
    sig = export.export("tiny", tmp_path / "artifacts", [folder])
    spec = sig["inputs"][0]
    assert (spec["min"], spec["max"], "ranges" in spec) == (
        [0.0, None, None], [10.0, None, 7.5], False)
    on_disk = json.loads((tmp_path / "artifacts" / "signature.json").read_text())
    assert on_disk["inputs"][0]["min"] == [0.0, None, None]
    row = {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4}
    rest.decode_body(json.dumps(row).encode(), sig)
    for name, value, message in [
            ("sepal_length", 12, "value for 'sepal_length' is 12, above its maximum 10"),
            ("sepal_length", -1, "value for 'sepal_length' is -1, below its minimum 0"),
            ("petal_length", 8, "value for 'petal_length' is 8, above its maximum 7.5")]:
        err = refused(json.dumps({**row, name: value}).encode(), sig)
        assert (str(err), err.status) == (message, 400)


def test_an_example_outside_its_declared_range_fails_the_export(tmp_path):
    folder = declared(tmp_path, DECLARATION.replace("sepal_length = 5.1", "sepal_length = 11"))
    with pytest.raises(export.ExportError) as caught:
        export.export("tiny", tmp_path / "artifacts", [folder])
    assert "value for 'sepal_length' is 11, above its maximum 10" in str(caught.value)


@pytest.mark.parametrize("ranges, message", [
    ("{sepal_length = [10, 0]}", "ranges.sepal_length must be [low, high] with low <= high"),
    ("{sepal_length = [0]}", "ranges.sepal_length must be [low, high] with low <= high"),
    ("{sepal_length = [0, nan]}", "ranges.sepal_length must be [low, high] with low <= high"),
    ('{sepal_length = ["0", 1]}', "ranges.sepal_length must be [low, high] with low <= high"),
    ("{colour = [0, 1]}", "ranges name unknown features ['colour']"),
])
def test_a_bad_ranges_table_fails_the_declaration(tmp_path, ranges, message):
    folder = declared(tmp_path, DECLARATION.replace(
        "{sepal_length = [0, 10], petal_length = [-inf, 7.5]}", ranges))
    with pytest.raises(declaration.DeclarationError) as caught:
        declaration.load(folder / "tiny.toml")
    assert message in str(caught.value)


def test_ranges_and_min_max_together_are_refused(tmp_path):
    folder = declared(tmp_path, DECLARATION.replace("ranges =", "min = 0\nranges ="))
    with pytest.raises(declaration.DeclarationError, match="give ranges or min/max, not both"):
        declaration.load(folder / "tiny.toml")


def test_a_recipe_model_gets_its_ranges_checked_once_its_names_are_known():
    spec = {"name": "input", "kind": "features", "names": ["a", "b"],
            "ranges": {"b": [0, float("inf")]}}
    assert declaration.feature_bounds(spec) == {"min": [None, 0.0]}
    with pytest.raises(declaration.DeclarationError, match=r"unknown features \['c'\]"):
        declaration.feature_bounds({**spec, "ranges": {"c": [0, 1]}})


@pytest.mark.parametrize("size", [(1, 1), (28, 28), (640, 17), (4096, 4096)])
def test_png_header_read_directly_declares_what_pil_reads(size):
    out = io.BytesIO()
    Image.new("L", size).save(out, format="PNG")
    raw = out.getvalue()
    assert images._png_size(raw) == size
    assert images.declared_pixels(raw) == limits.image_cost(*size)


def test_a_png_without_a_plain_ihdr_goes_through_pil():
    raw = images.PNG_MAGIC + b"\x00\x00\x00\x0dIHDX" + bytes(17)
    assert images._png_size(raw) is None
    assert images.declared_pixels(raw) == 0
    assert images._png_size(images.PNG_MAGIC + b"\x00\x00\x00\x0dIHDR" + bytes(17)) is None


# --- an image's shape ---------------------------------------------------------------------
# The thinnest and the widest image whose rows and columns cost no more than a 4096 x 4096
# square (limits.ROW_PIXELS, limits.COLUMN_PIXELS).
THINNEST, WIDEST = (1, 1_205_393), (1_406_292, 1)


@pytest.mark.parametrize("size", [(4096, 4096), THINNEST, WIDEST, (64, 65_536)])
def test_an_image_of_any_shape_within_the_squares_cost_is_admitted(size):
    assert images.declared_pixels(blank_png(*size)) == limits.image_cost(*size)
    assert limits.image_cost(*size) <= limits.MAX_IMAGE_COST == 16_875_520


@pytest.mark.parametrize("size, cost", [((1, 16_777_216), 234_881_035),
                                        ((16_777_216, 1), 201_326_605),
                                        ((1, THINNEST[1] + 1), 16_875_527),
                                        ((WIDEST[0] + 1, 1), 16_875_529)])
def test_a_thin_png_is_refused_from_its_header_by_what_its_shape_costs(size, cost,
                                                                       image_signature,
                                                                       monkeypatch):
    raw = blank_png(*size)
    monkeypatch.setattr(images.pyspng, "load", pytest.fail)
    monkeypatch.setattr(Image.Image, "load", pytest.fail)
    message = (f"image is {size[0]}x{size[1]} pixels, too thin: its rows and columns cost as "
               f"much to decode and resize as {cost} pixels, more than the limit of 16875520 "
               "(a 4096x4096 image's)")
    err = refused(raw, image_signature)
    assert (str(err), err.status) == (message, 413)
    with pytest.raises(errors.BadInput, match=r"^image is .* too thin"):
        images.unit_image_from_bytes(raw, 1)  # a batch job's path: no request admitted first


def test_a_thin_jpeg_is_refused_from_its_header_too(image_signature):
    out = io.BytesIO()
    Image.new("L", (256, 65_500)).save(out, "JPEG")  # libjpeg's longest side is 65,500
    err = refused(out.getvalue(), image_signature)
    assert (str(err), err.status) == (
        "image is 256x65500 pixels, too thin: its rows and columns cost as much to decode and "
        "resize as 17622316 pixels, more than the limit of 16875520 (a 4096x4096 image's)", 413)


def scaled_then_cut(unit, height, width):
    """The crop policy as it reads: the whole image scaled until its shorter side fits, then
    its centre cut out."""
    scale = max(height / unit.shape[0], width / unit.shape[1])
    rows = max(height, math.floor(unit.shape[0] * scale + 0.5))
    cols = max(width, math.floor(unit.shape[1] * scale + 0.5))
    scaled = images.resize_planes(unit, rows, cols)
    top, left = (rows - height) // 2, (cols - width) // 2
    return scaled[top:top + height, left:left + width]


@pytest.mark.parametrize("shape", [(1, 3000), (3000, 1), (300, 200), (29, 28), (7, 9, 3),
                                   (100, 28), (640, 17, 3)])
def test_crop_resizes_only_the_centre_it_keeps_and_answers_as_scaling_all_would(shape):
    unit = np.random.default_rng(0).random(shape)
    for size in ((28, 28), (4, 6), (32, 16)):
        spec = {"channels": 1 if len(shape) == 2 else 3, "size": list(size), "resize": "crop"}
        # Lanczos weights of the box and of the whole agree but for float rounding: a tap at
        # the edge of the filter's reach can fall either side of it.
        np.testing.assert_allclose(images.fit_to_size(unit, spec),
                                   scaled_then_cut(unit, *size), rtol=0, atol=3e-5)
