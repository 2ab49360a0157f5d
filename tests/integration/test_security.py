"""Secure defaults against a real TorchServe: body size limit, model registration confined to
the local store (and off unless asked for: see test_predictions)."""

import shutil

import pytest
import requests

from kiln.deploy.server import Ports, Server, ServerSettings
from kiln.workspace import Workspace


def test_oversized_body_gets_413_and_the_server_keeps_serving(server, client):
    limit = server.settings.max_request_size
    r = requests.post(f"{server.url('inference')}/predictions/lenet", data=b"0" * (limit + 1),
                      headers={"Content-Type": "application/octet-stream",
                               "Authorization": f"Bearer {client.token}"}, timeout=30)
    assert r.status_code == 413
    assert client.predict_json("lenet", [[0] * 28] * 28).status == 200


@pytest.fixture(scope="module")
def model_api_server(archives, tmp_path_factory):
    """A second server, started with the model API on (kiln serve --enable-model-api)."""
    srv = Server(ServerSettings(run_dir=tmp_path_factory.mktemp("model-api"),
                                model_store=Workspace.current().model_store,
                                models=[], ports=Ports.free(), enable_model_api=True))
    with srv.running(timeout=120):
        yield srv


def register(srv, url, name):
    return requests.post(f"{srv.url('management')}/models", timeout=120,
                         params={"url": url, "model_name": name, "initial_workers": 1,
                                 "synchronous": "true"},
                         headers={"Authorization": f"Bearer {srv.keys()['management']}"})


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:9/lenet.mar",
    "https://example.invalid/lenet.mar",
])
def test_registration_from_a_remote_url_is_refused(model_api_server, url):
    r = register(model_api_server, url, "remote")
    assert 400 <= r.status_code < 500
    assert "allowed" in r.json()["message"].lower()


def test_registration_from_outside_the_store_is_refused(model_api_server, tmp_path):
    outside = tmp_path / "lenet.mar"
    shutil.copy(Workspace.current().model_store / "lenet.mar", outside)
    r = register(model_api_server, f"file://{outside}", "outside")
    assert 400 <= r.status_code < 500
    r = register(model_api_server, "../" + str(outside), "relative")
    assert 400 <= r.status_code < 500


def test_registration_from_the_store_works_with_the_management_token(model_api_server):
    r = register(model_api_server, "lenet.mar", "lenet_again")
    assert r.status_code == 200, r.text
    no_token = requests.post(f"{model_api_server.url('management')}/models",
                             params={"url": "mlp.mar"}, timeout=30)
    assert 400 <= no_token.status_code < 500
