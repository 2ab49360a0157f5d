"""KServe's own Python SDK (InferenceRESTClient, protocol v2) against Kiln as a user meets it:
through the front proxy, with a key. Its answers are compared with tritonclient's over the
same route, for JSON tensors and for binary ones (the binary tensor data extension). The SDK
runs in an interpreter of its own (kserve_sdk.py says why)."""

import json
from pathlib import Path

import httpx
import kserve_sdk
import numpy as np
import pytest
import tritonclient.http as triton
from PIL import Image

from kiln.deploy.server import Ports, Server, ServerSettings
from kiln.model_store.build import ensure_built
from kiln.workspace import Workspace

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
DIGITS = [str(d) for d in range(10)]
# An image model, a binary classifier and a declared model with two inputs.
MODELS = ["lenet", "binary", "digit_tokens"]


@pytest.fixture(scope="module")
def kiln(tmp_path_factory):
    """As kiln serve runs it: the front proxy with its keys on the public ports."""
    for name in MODELS:
        ensure_built(name)
    srv = Server(ServerSettings(run_dir=tmp_path_factory.mktemp("kserve-sdk"),
                                model_store=Workspace.current().model_store, models=MODELS,
                                ports=Ports.free(), internal_ports=Ports.free(),
                                cores=len(MODELS)))
    with srv.running(timeout=240):
        yield srv


def key(server):
    # A fresh dict each call: both clients add their own headers to the one they are given.
    return {"Authorization": f"Bearer {server.keys()['inference']}"}


def digit_pixels():
    return np.stack([np.asarray(Image.open(FIXTURES / "digits" / f"{d}.png")) for d in DIGITS]
                    ).astype(np.float32)


def cancer_rows():
    rows = json.loads((FIXTURES / "breast_cancer" / "rows.json").read_text())
    return np.array([row["features"] for row in rows]), [row["label"] for row in rows]


def token_inputs(digit):
    body = json.loads((FIXTURES / "digit_tokens" / f"{digit}.json").read_text())
    return {name: np.array([values], dtype=np.int64) for name, values in body.items()}


def sdk_infer(server, model, arrays, binary, model_name=None):
    """{output name: array} of the SDK's answer; `model_name`: the body's (the model's). An
    HTTP error: (status, JSON body)."""
    name, outputs = kserve_sdk.call(kserve_sdk.rest_infer, server.url("oip"), key(server), model,
                                    arrays, binary, model_name)
    if isinstance(name, int):
        return name, outputs
    assert name == model
    return outputs


def triton_infer(server, model, arrays, binary):
    """{output name: array} of tritonclient's answer over the same route."""
    tensors = []
    for name, array in arrays.items():
        tensor = triton.InferInput(name, list(array.shape), triton.np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array, binary_data=binary)
        tensors.append(tensor)
    client = triton.InferenceServerClient(server.url("oip").split("://", 1)[1])
    try:
        result = client.infer(model, tensors, headers=key(server))
    finally:
        client.close()
    return {o["name"]: result.as_numpy(o["name"]) for o in result.get_response()["outputs"]}


def assert_same_answers(sdk_outputs, triton_outputs, labels):
    assert list(sdk_outputs) == list(triton_outputs) == ["probabilities", "label"]
    np.testing.assert_array_equal(sdk_outputs["probabilities"], triton_outputs["probabilities"])
    assert sdk_outputs["probabilities"].dtype == np.float32
    # tritonclient gives BYTES as bytes, the SDK as text.
    assert [label.decode() for label in triton_outputs["label"].tolist()] == labels
    assert sdk_outputs["label"].tolist() == labels


def test_the_sdk_sees_the_server_live_and_each_model_ready(kiln):
    assert kserve_sdk.call(kserve_sdk.rest_probe, kiln.url("oip"), key(kiln), MODELS) == (
        True, True, [True] * len(MODELS), False)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_sdk_infers_digits_as_tritonclient_does(kiln, binary):
    pixels = {"input": digit_pixels()}
    assert_same_answers(sdk_infer(kiln, "lenet", pixels, binary),
                        triton_infer(kiln, "lenet", pixels, binary), DIGITS)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_sdk_infers_tumours_as_tritonclient_does(kiln, binary):
    features, labels = cancer_rows()
    values = {"input": features}
    answer = sdk_infer(kiln, "binary", values, binary)
    assert_same_answers(answer, triton_infer(kiln, "binary", values, binary), labels)
    assert answer["probabilities"].shape == (len(labels), 2)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_sdk_infers_a_two_input_model_as_tritonclient_does(kiln, binary):
    for digit in ("3", "8"):
        tokens = token_inputs(digit)
        assert_same_answers(sdk_infer(kiln, "digit_tokens", tokens, binary),
                            triton_infer(kiln, "digit_tokens", tokens, binary), [digit])


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_a_body_naming_another_model_gets_400_naming_both(kiln, binary):
    assert sdk_infer(kiln, "lenet", {"input": digit_pixels()[:1]}, binary,
                     model_name="binary") == (400, {
        "error": '"model_name" in the infer request is "binary", but it reached model "lenet"',
        "code": 400})


def test_a_body_may_name_the_version_that_answers_and_no_other(kiln):
    base = f"{kiln.url('oip')}/v2/models/lenet"
    (version,) = httpx.get(base, headers=key(kiln), timeout=30).json()["versions"]
    tensor = {"name": "input", "shape": [1, 28, 28], "datatype": "FP32",
              "data": digit_pixels()[:1].ravel().tolist()}
    answers = [httpx.post(f"{base}/infer", headers=key(kiln), timeout=30,
                          json={"model_name": "lenet", "model_version": named,
                                "inputs": [tensor]})
               for named in (version, f"{version}9")]
    assert answers[0].status_code == 200, answers[0].text
    assert answers[0].json()["model_version"] == version
    assert (answers[1].status_code, answers[1].json()) == (400, {
        "error": f'"model_version" in the infer request is "{version}9", but version '
                 f'"{version}" of "lenet" answers it; pin a version in the path: '
                 f'/v2/models/NAME/versions/VERSION/infer', "code": 400})
