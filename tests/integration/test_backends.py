"""ONNX Runtime and TorchScript archives of the same weights answer alike, through TorchServe."""

from pathlib import Path

import pytest

from kiln import client as http
from kiln.deploy.server import Ports, Server, ServerSettings
from kiln.model_store import archive

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
MODELS = ["lenet", "rnn", "binary"]


@pytest.fixture(scope="module")
def torchscript_server(archives, tmp_path_factory):
    store = tmp_path_factory.mktemp("ts-store")
    for name in MODELS:
        mar = archive.build(name, "torchscript", store=store)
        assert mar == store / f"{name}.mar"
    srv = Server(ServerSettings(run_dir=tmp_path_factory.mktemp("ts-run"), model_store=store,
                                models=MODELS, ports=Ports.free()))
    with srv.running(timeout=180):
        yield srv


def inputs():
    for model in ("lenet", "rnn"):
        for digit in "0123456789":
            yield model, FIXTURES / "digits" / f"{digit}.png"
        yield model, FIXTURES / "digits" / "paper_7.jpg"
    for label in ("benign", "malignant"):
        yield "binary", FIXTURES / "breast_cancer" / f"{label}.json"


def probabilities(answer: dict) -> dict[str, float]:
    if "top_k" in answer:
        return {t["label"]: t["probability"] for t in answer["top_k"]}
    return {answer["label"]: answer["probability"]}


@pytest.mark.parametrize("model,path", list(inputs()), ids=lambda v: getattr(v, "name", v))
def test_same_answer_from_both_backends(client, torchscript_server, model, path):
    ts_client = http.Client(torchscript_server.url("inference"),
                            torchscript_server.keys()["inference"])
    onnx = client.predict_file(model, path)
    torchscript = ts_client.predict_file(model, path)
    assert onnx.status == torchscript.status == 200
    assert onnx.body["label"] == torchscript.body["label"]
    a, b = probabilities(onnx.body), probabilities(torchscript.body)
    assert a.keys() == b.keys()
    assert max(abs(a[k] - b[k]) for k in a) <= 1e-4


def test_torchscript_worker_reports_its_device(torchscript_server):
    log = (torchscript_server.log_dir / "model_log.log").read_text()
    for name in MODELS:
        assert f"model {name} (" in log
    assert log.count("TorchScript on cpu") == len(MODELS)
