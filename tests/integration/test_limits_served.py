"""The per-request bounds of handlers/limits.py through a real server: each over-bound request
gets its 413 or 400 naming the bound, and the next good request is answered right."""

import base64
import functools
import io
import json
from pathlib import Path

import pytest
import requests
from PIL import Image

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
SEVEN = (FIXTURES / "digits" / "7.png").read_bytes()
BENIGN = json.loads((FIXTURES / "breast_cancer" / "benign.json").read_text())
GOOD = {"lenet": (SEVEN, "image/png", "7"), "mlp": (SEVEN, "image/png", "7"),
        "rnn": (SEVEN, "image/png", "7"),
        "binary": (json.dumps(BENIGN).encode(), "application/json", "benign")}


@functools.lru_cache
def blank_png(width, height):
    """A black PNG of width x height (4096 x 4096 is 15 KiB)."""
    out = io.BytesIO()
    Image.new("L", (width, height)).save(out, "PNG")
    return out.getvalue()


def with_long_float():
    text = json.dumps(BENIGN)
    return text.replace(json.dumps(BENIGN["mean area"]), "1" * 100_000 + ".5", 1).encode()


BIG = base64.b64encode(blank_png(4096, 4096)).decode()
PIXEL_ROWS = [[0] * 28] * 28
CASES = [
    ("nested 100k deep", "lenet", b"[" * 100_000, 400,
     "JSON nested 100000 levels deep, more than the limit of 32"),
    ("70k arrays", "mlp", ("[" + ",".join(["[0]"] * 70_000) + "]").encode(), 413,
     "JSON body has 70001 arrays and objects, more than the limit of 65536"),
    ("100k-digit float", "binary", with_long_float(), 400,
     "a number has more than 4300 digits"),
    ("513 instances", "rnn", json.dumps({"instances": [PIXEL_ROWS] * 513}).encode(), 413,
     "513 instances in one request, more than 512"),
    ("two 4096x4096 images", "lenet", json.dumps({"instances": [{"b64": BIG}] * 2}).encode(),
     413, "the request's images declare more than 16875520 pixels together"),
]


def post(server, model, body, content_type):
    return requests.post(f"{server.url('inference')}/predictions/{model}", data=body,
                         timeout=60, headers={"Content-Type": content_type,
                                              "Authorization":
                                                  f"Bearer {server.keys()['inference']}"})


def assert_good_answer(server, model):
    body, content_type, label = GOOD[model]
    r = post(server, model, body, content_type)
    assert r.status_code == 200 and r.json()["label"] == label, r.text


@pytest.mark.parametrize("case,model,body,status,message", CASES, ids=[c[0] for c in CASES])
def test_an_over_bound_request_is_refused_and_the_next_answered(server, case, model, body,
                                                                status, message):
    r = post(server, model, body, "application/json")
    assert r.status_code == status, r.text
    assert r.json()["code"] == status and message in r.json()["error"]
    assert len(r.content) < 1024
    assert_good_answer(server, model)


def oip_infer(server, model, body):
    return requests.post(f"{server.url('oip')}/v2/models/{model}/infer", json=body, timeout=60,
                         headers={"Authorization": f"Bearer {server.keys()['inference']}"})


@pytest.mark.parametrize("case,body,message", [
    ("shape of 100000 rows, no data",
     {"inputs": [{"name": "input", "shape": [100_000, 28, 28], "datatype": "FP32",
                  "data": []}]}, "100000 instances in one request, more than 512"),
    ("id of 300 characters",
     {"id": "x" * 300, "inputs": [{"name": "input", "shape": [1, 28, 28], "datatype": "FP32",
                                   "data": [0] * 784}]},
     '"id" of 300 characters, more than the limit of 256'),
], ids=["rows", "id"])
def test_oip_requests_are_counted_from_their_shapes(server, case, body, message):
    r = oip_infer(server, "lenet", body)
    assert r.status_code == 413, r.text
    assert message in r.json()["error"]
    good = {"inputs": [{"name": "input", "shape": [1, 28, 28], "datatype": "FP32",
                        "data": [0] * 784}]}
    answer = oip_infer(server, "lenet", good)
    assert answer.status_code == 200 and answer.json()["model_name"] == "lenet", answer.text
    assert_good_answer(server, "lenet")


def test_a_thin_png_is_refused_by_its_cost_and_the_thinnest_admitted_answered(server):
    """Issue 16's 1 x 16,777,216 PNG (33 kB, within the pixel bound) took 5 s to answer; the
    thinnest image the handlers admit is answered as the blank square it frames to."""
    r = post(server, "lenet", blank_png(1, 16_777_216), "image/png")
    assert (r.status_code, r.json()) == (413, {
        "code": 413,
        "error": "image is 1x16777216 pixels, too thin: its rows and columns cost as much to "
                 "decode and resize as 234881035 pixels, more than the limit of 16875520 (a "
                 "4096x4096 image's)"}), r.text
    thinnest = post(server, "lenet", blank_png(1, 1_205_393), "image/png")
    blank = post(server, "lenet", blank_png(28, 28), "image/png")
    assert (thinnest.status_code, thinnest.json()) == (200, blank.json()), thinnest.text
    assert_good_answer(server, "lenet")
