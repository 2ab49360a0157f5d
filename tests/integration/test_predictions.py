"""Known inputs get known answers from a real TorchServe."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
DIGITS = [str(d) for d in range(10)]
IMAGE_MODELS = ["lenet", "mlp", "rnn"]


@pytest.mark.parametrize("model", IMAGE_MODELS)
@pytest.mark.parametrize("digit", DIGITS)
def test_fixture_digit_png_is_classified(client, model, digit):
    answer = client.predict_file(model, FIXTURES / "digits" / f"{digit}.png")
    assert answer.status == 200, answer.body
    assert answer.body["label"] == digit
    top = answer.body["top_k"]
    assert [t["label"] for t in top][0] == digit and len(top) == 3
    assert top[0]["probability"] == answer.body["probability"]
    assert top[0]["probability"] >= top[1]["probability"] >= top[2]["probability"]


@pytest.mark.parametrize("model", IMAGE_MODELS)
def test_dark_digit_on_paper_photo_is_classified(client, model):
    answer = client.predict_file(model, FIXTURES / "digits" / "paper_7.jpg")
    assert answer.status == 200, answer.body
    assert answer.body["label"] == "7"


@pytest.mark.parametrize("model", IMAGE_MODELS)
def test_json_pixel_array_gives_the_same_answer_as_the_png(client, model):
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(FIXTURES / "digits" / "4.png")).tolist()
    answer = client.predict_json(model, pixels)
    assert answer.status == 200, answer.body
    assert answer.body["label"] == "4"


def breast_cancer_rows():
    return json.loads((FIXTURES / "breast_cancer" / "rows.json").read_text())


@pytest.mark.parametrize("row", breast_cancer_rows(), ids=lambda r: r["label"])
def test_known_breast_cancer_rows_are_classified(client, row):
    answer = client.predict_json("binary", row["features"])
    assert answer.status == 200, answer.body
    assert answer.body["label"] == row["label"]
    assert 0.5 <= answer.body["probability"] <= 1.0
    assert set(answer.body) == {"label", "probability"}


@pytest.mark.parametrize("label", ["benign", "malignant"])
def test_named_features_object(client, label):
    answer = client.predict_file("binary", FIXTURES / "breast_cancer" / f"{label}.json")
    assert answer.status == 200, answer.body
    assert answer.body["label"] == label


def test_management_api_requires_its_token(server):
    import requests

    url = f"{server.url('management')}/models"
    refused = requests.get(url, timeout=10)
    assert 400 <= refused.status_code < 500
    wrong = requests.get(url, headers={"Authorization": "Bearer nope"}, timeout=10)
    assert 400 <= wrong.status_code < 500
    inference_key = requests.get(
        url, headers={"Authorization": f"Bearer {server.keys()['inference']}"}, timeout=10)
    assert 400 <= inference_key.status_code < 500
    ok = requests.get(url, headers={"Authorization": f"Bearer {server.keys()['management']}"},
                      timeout=10)
    assert ok.status_code == 200
    assert sorted(m["modelName"] for m in ok.json()["models"]) == [
        "binary", "lenet", "mlp", "rnn"]


def test_model_registration_api_is_off(server):
    import requests

    r = requests.post(f"{server.url('management')}/models", params={"url": "lenet.mar"},
                      headers={"Authorization": f"Bearer {server.keys()['management']}"},
                      timeout=10)
    assert r.status_code == 405
    assert r.json()["type"] == "MethodNotAllowedException"


def kiln(*args):
    return subprocess.run([sys.executable, "-m", "kiln.cli", *args], capture_output=True,
                          text=True, timeout=60)


def test_kiln_predict_checks_the_answer(server, client):
    common = ["--url", server.url("inference"), f"--token={client.token}"]
    seven = str(FIXTURES / "digits" / "7.png")
    done = kiln("predict", "lenet", seven, *common, "--expect", "7")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("lenet: 7  (p=")
    wrong = kiln("predict", "lenet", seven, *common, "--expect", "1")
    assert wrong.returncode == 2
    assert "expected '1', got '7'" in wrong.stderr
    bad = kiln("predict", "binary", seven, *common)
    assert bad.returncode == 1
    assert json.loads(bad.stdout) == {"error": "this model takes features, not an image",
                                      "code": 400}
