"""Kiln's log configuration: errors kept, nothing written twice, access log only on request."""

import pytest

from kiln.deploy.server import Ports, Server, ServerSettings
from kiln.workspace import Workspace


def log_lines(srv, name):
    path = srv.log_dir / name
    return path.read_text().splitlines() if path.exists() else []


def test_frontend_lines_are_written_once_and_no_access_log_by_default(server, client):
    assert client.predict("lenet/doesnotexist", b"{}", "application/json").status == 404
    assert client.predict_json("lenet", [[0] * 28] * 28).status == 200
    # The start's lines (the main thread's): under load, two requests in one millisecond can
    # log the same line twice, legitimately; stock TorchServe writes every line twice.
    started = [line for line in log_lines(server, "ts_log.log")
               if line[:4].isdigit() and "] main " in line]
    assert len(started) > 10, "ts_log.log is written"
    assert len(started) == len(set(started))
    assert not log_lines(server, "access_log.log")


def test_per_request_worker_chatter_stays_out_of_the_log(server, client):
    answer = client.predict("binary", b"hello", "text/plain")
    assert answer.status == 400
    model_log = "\n".join(log_lines(server, "model_log.log"))
    # TorchServe's worker logs every request on stdout (recorded at INFO): dropped.
    assert "Backend received inference" not in model_log
    # Kiln's own lines go to stderr and are kept: which provider each model really got.
    for name in ("lenet", "mlp", "rnn", "binary"):
        assert f"model {name} (" in model_log
    assert "CPUExecutionProvider" in model_log


def test_the_frontend_logs_no_line_per_request_or_batch(server, client):
    for _ in range(3):
        assert client.predict_json("lenet", [[0] * 28] * 28).status == 200
    ts_log = "\n".join(log_lines(server, "ts_log.log"))
    # TorchServe's per-request and per-batch INFO lines: off (deploy/log4j2.xml).
    for chatter in ("Sending response for jobId", "Backend response time",
                    "Looping backend response at"):
        assert chatter not in ts_log
    # The worker's other lines stay: how each worker reached its model.
    assert "org.pytorch.serve.wlm.WorkerThread - Connecting to: " in ts_log


@pytest.fixture(scope="module")
def access_logged(archives, tmp_path_factory):
    srv = Server(ServerSettings(run_dir=tmp_path_factory.mktemp("access"),
                                model_store=Workspace.current().model_store,
                                models=["binary"], ports=Ports.free(), access_log=True))
    with srv.running(timeout=120):
        yield srv


def test_access_log_when_asked_for(access_logged):
    from kiln import client as http

    c = http.Client(access_logged.url("inference"), access_logged.keys()["inference"])
    for _ in range(3):
        assert c.predict_json("binary", [0.0] * 30).status == 200
    lines = [line for line in log_lines(access_logged, "access_log.log")
             if "/predictions/binary" in line]
    assert len(lines) == 3
