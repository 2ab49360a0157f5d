"""The Open Inference Protocol (KServe v2 REST) against a real TorchServe, called the way a
standard client calls it: health, server metadata, model metadata and readiness, then infer."""

import json
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from kiln.handlers import oip as oip_codec
from kiln.workspace import Workspace

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
IMAGE_MODELS = ["lenet", "mlp", "rnn"]
DIGITS = [str(d) for d in range(10)]


class OipClient:
    """The calls a KServe v2 REST client makes, with Kiln's inference token."""

    def __init__(self, server):
        self.base = f"{server.url('oip')}/v2"
        self.headers = {"Authorization": f"Bearer {server.keys()['inference']}"}

    def get(self, path=""):
        return requests.get(self.base + path, headers=self.headers, timeout=30)

    def infer(self, model, body):
        return requests.post(f"{self.base}/models/{model}/infer", json=body,
                             headers=self.headers, timeout=30)


@pytest.fixture(scope="module")
def oip(server):
    return OipClient(server)


def signature(model):
    return json.loads((Workspace.current().exports(model) / "signature.json").read_text())


def digit_pixels():
    return [np.asarray(Image.open(FIXTURES / "digits" / f"{d}.png")).tolist() for d in DIGITS]


def cancer_rows():
    return json.loads((FIXTURES / "breast_cancer" / "rows.json").read_text())


def tensor(shape, datatype, data, name="input"):
    return {"name": name, "shape": shape, "datatype": datatype, "data": data}


def ready_and_described(oip, model):
    """What a standard client checks before it infers; returns the model's metadata."""
    assert (oip.get("/health/live").status_code, oip.get("/health/live").json()) == (
        200, {"live": True})
    assert (oip.get("/health/ready").status_code, oip.get("/health/ready").json()) == (
        200, {"ready": True})
    r = oip.get(f"/models/{model}/ready")
    assert (r.status_code, r.json()) == (200, {"ready": True, "name": model})
    r = oip.get(f"/models/{model}")
    assert r.status_code == 200
    assert r.json() == oip_codec.model_metadata(signature(model), "1.0")
    return r.json()


@pytest.mark.parametrize("model", ["lenet", "binary"])
def test_model_metadata_is_the_archives_file_built_once_in_python(oip, model):
    """The plugin serves the archive's oip-metadata.json with the served name and version; it
    builds no tensors of its own (kiln.handlers.oip.tensor_metadata is the one place)."""
    with zipfile.ZipFile(Workspace.current().model_store / f"{model}.mar") as mar:
        shipped = json.loads(mar.read(oip_codec.METADATA_FILE))
    assert shipped == oip_codec.tensor_metadata(signature(model))
    r = oip.get(f"/models/{model}")
    assert (r.status_code, r.json()) == (200, {"name": model, "versions": ["1.0"], **shipped})


def test_server_metadata_and_where_to_find_it(oip, server):
    r = oip.get()
    assert (r.status_code, r.json()) == (200, {"name": "kiln", "version": "0.12.0",
                                               "extensions": ["binary_tensor_data"]})
    r = requests.get(f"{server.url('inference')}/kiln-oip", headers=oip.headers, timeout=30)
    assert r.json() == {"oip": oip.base}


@pytest.mark.parametrize("model", IMAGE_MODELS)
def test_image_model_flow_labels_every_fixture_digit(oip, model):
    metadata = ready_and_described(oip, model)
    assert metadata["inputs"][0]["shape"] == [-1, 28, 28]
    pixels = digit_pixels()
    flat = np.asarray(pixels, dtype=np.uint8).ravel().tolist()
    r = oip.infer(model, {"id": f"{model}-1",
                          "inputs": [tensor([10, 28, 28], "UINT8", flat)]})
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["model_name"] == model and answer["id"] == f"{model}-1"
    probabilities, labels = answer["outputs"]
    assert labels == {"name": "label", "shape": [10], "datatype": "BYTES", "data": DIGITS}
    assert (probabilities["name"], probabilities["shape"], probabilities["datatype"]) == (
        "probabilities", [10, 10], "FP32")
    table = np.array(probabilities["data"]).reshape(10, 10)
    assert np.argmax(table, axis=1).tolist() == list(range(10))


def test_nested_fp32_tensor_answers_as_predictions_does(oip, client):
    pixels = digit_pixels()[4]
    r = oip.infer("mlp", {"inputs": [tensor([1, 1, 28, 28], "FP32", [[pixels]])],
                          "outputs": [{"name": "probabilities"}]})
    assert r.status_code == 200, r.text
    assert [o["name"] for o in r.json()["outputs"]] == ["probabilities"]
    kiln = client.predict_json("mlp", pixels)
    assert kiln.status == 200
    data = r.json()["outputs"][0]["data"]
    assert data[4] == kiln.body["probability"]


def test_binary_model_flow_labels_every_fixture_row(oip):
    metadata = ready_and_described(oip, "binary")
    assert metadata["inputs"][0]["shape"] == [-1, 30]
    rows = cancer_rows()
    r = oip.infer("binary", {"inputs": [tensor([len(rows), 30], "FP64",
                                               [row["features"] for row in rows])]})
    assert r.status_code == 200, r.text
    labels = r.json()["outputs"][1]
    assert labels["data"] == [row["label"] for row in rows]
    table = np.array(r.json()["outputs"][0]["data"]).reshape(len(rows), 2)
    np.testing.assert_allclose(table.sum(axis=1), 1.0, rtol=1e-6)


@pytest.mark.parametrize(("model", "body", "message"), [
    ("binary", {"inputs": [tensor([1, 30], "BYTES", ["a"] * 30)]},
     "input 'input' has datatype \"BYTES\"; expected one of FP16, FP32, FP64, UINT8, UINT16, "
     "UINT32, UINT64, INT8, INT16, INT32, INT64"),
    ("binary", {"inputs": [tensor([1, 29], "FP32", [0.0] * 29)]},
     "input 'input' has shape [1, 29], expected [N, 30]"),
    ("binary", {"inputs": [tensor([1, 30], "FP32", [0.0] * 30, name="x")]},
     "unknown input tensor \"x\": this model's input is 'input'"),
    ("mlp", {"inputs": [tensor([1, 28, 28], "FP32", [0] * 783 + [300])]},
     "input 'input': pixel at [0, 27, 27] is 300, outside [0, 255]"),
])  # fmt: skip
def test_bad_tensors_get_400_with_the_reason(oip, model, body, message):
    r = oip.infer(model, body)
    assert (r.status_code, r.json()) == (400, {"error": message, "code": 400})


def test_nan_gets_400(oip, server):
    # json.dumps writes NaN as the bare token NaN, as numpy-based clients do.
    body = json.dumps({"inputs": [tensor([1, 30], "FP32", [0.0] * 29 + [float("nan")])]})
    r = requests.post(f"{oip.base}/models/binary/infer", data=body, timeout=30,
                      headers={**oip.headers, "Content-Type": "application/json"})
    assert (r.status_code, r.json()) == (
        400, {"error": "input 'input' value at [29] is not a finite number: NaN", "code": 400})


def test_unknown_model_and_route_get_404(oip):
    assert (oip.get("/models/nope").status_code, oip.get("/models/nope").json()) == (
        404, {"error": "no model 'nope'", "code": 404})
    r = oip.infer("nope", {"inputs": []})
    assert (r.status_code, r.json()) == (404, {"error": "no model 'nope'", "code": 404})
    assert oip.get("/models/mlp/versions/9.9/ready").status_code == 404


@pytest.mark.parametrize("token", [None, "wrong", "management"])
def test_routes_need_a_key_but_the_health_routes(oip, server, token):
    token = server.keys()["management"] if token == "management" else token
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    for path in ("/models/mlp", "/models/mlp/ready", "/"):
        r = requests.get(f"{oip.base}{path}", headers=headers, timeout=30)
        assert (r.status_code, r.json()) == (401, {"error": "missing or unknown key",
                                                   "code": 401})
    # KServe's probes ask these without a key.
    assert requests.get(f"{oip.base}/health/live", headers=headers, timeout=30).json() == {
        "live": True}
    assert requests.get(f"{oip.base}/health/ready", headers=headers, timeout=30).json() == {
        "ready": True}


def scale(server, model, workers):
    r = requests.put(f"{server.url('management')}/models/{model}", timeout=120,
                     params={"min_worker": workers, "max_worker": workers,
                             "synchronous": "true"},
                     headers={"Authorization": f"Bearer {server.keys()['management']}"})
    assert r.status_code == 200, r.text


def test_ready_is_false_while_a_model_has_no_loaded_worker(oip, server):
    scale(server, "mlp", 0)
    try:
        r = oip.get("/models/mlp/ready")
        assert (r.status_code, r.json()) == (400, {"ready": False, "name": "mlp"})
        r = oip.get("/health/ready")
        assert (r.status_code, r.json()) == (400, {"ready": False})
        assert oip.get("/models/lenet/ready").status_code == 200
        # TorchServe's own /ping still says Healthy: why Kiln's ready routes are the plugin's.
        r = requests.get(f"{server.url('inference')}/ping", headers=oip.headers, timeout=30)
        assert r.json() == {"status": "Healthy"}
    finally:
        scale(server, "mlp", 1)
    r = oip.get("/models/mlp/ready")
    assert (r.status_code, r.json()) == (200, {"ready": True, "name": "mlp"})


def test_server_readiness_waits_for_every_startup_model(tmp_path):
    """Right after start TorchServe has registered no model yet: the OIP plugin must not call
    "every model is ready" true then (it did, for about a second)."""
    from kiln.deploy.server import Ports, Server, ServerSettings
    from kiln.model_store.build import ensure_built

    ensure_built("binary")
    server = Server(ServerSettings(run_dir=tmp_path, model_store=Workspace.current().model_store,
                                   models=["binary"],
                                   ports=Ports.free()))
    server.start()
    try:
        base, deadline, first_ready = server.url("oip"), time.monotonic() + 120, None
        while time.monotonic() < deadline and first_ready is None:
            try:
                headers = {"Authorization": f"Bearer {server.keys()['inference']}"}
            except (OSError, ValueError, KeyError):  # the key file is not written yet
                time.sleep(0.02)
                continue
            try:
                health = requests.get(f"{base}/v2/health/ready", headers=headers, timeout=2)
            except requests.ConnectionError:
                time.sleep(0.02)
                continue
            if health.status_code == 200:
                first_ready = requests.get(f"{base}/v2/models/binary/ready", headers=headers,
                                           timeout=2).status_code
            time.sleep(0.02)
        assert first_ready == 200
    finally:
        server.stop()
