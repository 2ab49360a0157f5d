"""Models added by their declaration alone, served by a real TorchServe.

A model with two inputs (token ids and an attention mask, variable length), end to end: REST
(a JSON object keyed by input name, one or several), the Open Inference Protocol (one named
tensor per input), gRPC (one map key per input) and a batch job (one column per input). A
regression model: named values in the target's units, on REST and OIP."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from kiln import client as http
from kiln import declaration
from kiln.deploy.server import Ports, Server, ServerSettings
from kiln.model_store.build import ensure_built
from kiln.workspace import Workspace

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures" / "digit_tokens"
MODEL = "digit_tokens"
REGRESSION = "diabetes"


@pytest.fixture(scope="module")
def two_input_server(tmp_path_factory):
    for name in (MODEL, REGRESSION):
        ensure_built(name)
    srv = Server(ServerSettings(run_dir=tmp_path_factory.mktemp("two-inputs"),
                                model_store=Workspace.current().model_store, models=[MODEL,
                                REGRESSION],
                                ports=Ports.free()))
    with srv.running(timeout=240):
        yield srv


def example(digit: str) -> dict:
    return json.loads((FIXTURES / f"{digit}.json").read_text())


def test_rest_takes_an_object_keyed_by_input_name(two_input_server):
    client = http.Client(two_input_server.url("inference"), two_input_server.keys()["inference"])
    answer = client.predict_json(MODEL, example("3"))
    assert answer.status == 200, answer.body
    assert answer.body["label"] == "3"
    # Two requests of different lengths in one body: padded together, each answered.
    short = {k: v[:40] for k, v in example("8").items()}
    answer = client.predict_json(MODEL, {"instances": [example("3"), short, example("8")]})
    assert answer.status == 200, answer.body
    assert [a["label"] for a in answer.body][::2] == ["3", "8"]


def test_rest_names_a_missing_input(two_input_server):
    client = http.Client(two_input_server.url("inference"), two_input_server.keys()["inference"])
    answer = client.predict_json(MODEL, {"input_ids": example("3")["input_ids"]})
    assert answer.status == 400
    assert "attention_mask" in answer.body["error"]


def test_oip_takes_one_named_tensor_per_input(two_input_server):
    token = two_input_server.keys()["inference"]
    url = f"{two_input_server.url('oip')}/v2/models/{MODEL}"
    headers = {"Authorization": f"Bearer {token}"}
    meta = requests.get(url, headers=headers, timeout=10).json()
    assert [(i["name"], i["datatype"]) for i in meta["inputs"]] == [
        ("input_ids", "INT64"), ("attention_mask", "INT64")]
    body = example("8")
    n = len(body["input_ids"])
    infer = {"inputs": [{"name": name, "shape": [1, n], "datatype": "INT64", "data": values}
                        for name, values in body.items()]}
    answer = requests.post(f"{url}/infer", json=infer, headers=headers, timeout=10)
    assert answer.status_code == 200, answer.text
    label = next(o for o in answer.json()["outputs"] if o["name"] == "label")
    assert label["data"] == ["8"]


def test_grpc_takes_one_map_key_per_input(two_input_server):
    from kiln.grpc_client import GrpcClient

    client = GrpcClient(f"127.0.0.1:{two_input_server.ports.grpc_inference}",
                        two_input_server.keys()["inference"], 30)
    answer = client.predict_inputs(MODEL, example("3"))
    assert answer.ok, answer.body
    assert answer.body["label"] == "3"


def test_batch_job_takes_one_column_per_input(two_input_server, tmp_path):
    rows = tmp_path / "rows.csv"
    with rows.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["input_ids", "attention_mask"])
        for digit in ("3", "8", "3"):
            body = example(digit)
            writer.writerow([json.dumps(body["input_ids"]), json.dumps(body["attention_mask"])])
    out = tmp_path / "predictions.csv"
    for via in ("local", "server"):
        done = subprocess.run(
            [sys.executable, "-m", "kiln.cli", "batch", MODEL, str(rows), str(out), "--via", via,
             "--url", two_input_server.url("inference"),
             "--token=" + two_input_server.keys()["inference"], "--no-progress"],
            capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        with out.open() as f:
            assert [r["label"] for r in csv.DictReader(f)] == ["3", "8", "3"], via
        out.unlink()


def expected_regression(body: bytes) -> float:
    """What the exported graph gives for the example, decoded as the server decodes it."""
    from kiln.handlers import backends, rest, signature

    folder = REPO / "artifacts" / REGRESSION
    sig = signature.load_signature(folder / "signature.json")
    backend = backends.load_backend(str(folder / "model.onnx"), intra_op_threads=1,
                                    input_names=signature.input_names(sig))
    xs, _ = rest.decode_body(body, sig)
    return float(backend.run(xs)[0][0])


def test_regression_answers_named_values_in_their_units(two_input_server):
    (example_,) = declaration.get(REGRESSION).examples
    token = two_input_server.keys()["inference"]
    client = http.Client(two_input_server.url("inference"), token)
    answer = client.predict(REGRESSION, example_.body(), "application/json")
    assert answer.status == 200, answer.body
    value = expected_regression(example_.body())
    assert answer.body == {"values": {"progression": value},
                           "units": {"progression": "progression score"}}
    names = list(example_.value)
    infer = {"inputs": [{"name": "input", "shape": [1, len(names)], "datatype": "FP64",
                         "data": [example_.value[n] for n in names]}]}
    oip = requests.post(f"{two_input_server.url('oip')}/v2/models/{REGRESSION}/infer",
                        json=infer, headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert oip.status_code == 200, oip.text
    (output,) = oip.json()["outputs"]
    assert (output["name"], output["shape"]) == ("values", [1, 1])
    assert output["data"] == [pytest.approx(value, rel=1e-6)]
