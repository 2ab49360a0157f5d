"""kiln-container on the host, as a container would run it (docs/deploy.md): nginx in front
with the keys and the probes, TorchServe behind it on loopback, SIGTERM drained.

One entrypoint serves the module; the drain test runs last and stops it."""

import json
import logging
import shutil
import signal
import socket
import subprocess
import time
from collections import Counter

import psutil
import pytest
import requests
from container_harness import (
    DRAIN_DELAY_S,
    FIXTURES,
    GRACE_S,
    KEY_1,
    KEY_2,
    MODEL,
    UNAUTHORIZED,
    Container,
    Load,
    benign_body,
    readiness_probes,
    write_keys,
)

from kiln.deploy import contract
from kiln.grpc_client import GrpcClient
from kiln.model_store.build import ensure_built

log = logging.getLogger("kiln.tests")

@pytest.fixture(scope="module")
def container(tmp_path_factory):
    ensure_built(MODEL)
    box = Container(tmp_path_factory.mktemp("container"))
    try:
        box.wait_ready()
        yield box
    finally:
        box.kill()


def eventually(check, timeout: float = 8.0) -> None:
    """Key changes reach nginx within a poll and a reload: a few seconds at most."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not within the time a keys reload takes"
        time.sleep(0.2)


# -- (a) probes, keys, ports ------------------------------------------------------------------
def test_ready_only_once_the_worker_has_loaded(container):
    before = [p.status for p in container.startup[:-1]]
    assert container.startup[-1].status == 200
    assert set(before) <= {None, 503}, before
    # nginx answered 503 while TorchServe was up but its worker was not (/ping said Healthy).
    assert 503 in before
    # The moment /ready said 200, the model answers.
    r = container.predict(KEY_1)
    assert r.status_code == 200, r.text
    assert r.json()["label"] == "benign"
    assert container.probe(contract.LIVE_PATH) == 200
    assert container.probe("/v2/health/ready", port="oip") == 200


def test_rest_needs_a_known_key(container):
    for key in (None, "wrong-" + "x" * 30, KEY_1.lower()):
        r = container.predict(key)
        assert (r.status_code, r.json()) == (401, UNAUTHORIZED), key
    assert container.predict(KEY_1).status_code == 200


def test_oip_needs_a_known_key(container):
    rows = json.loads((FIXTURES / "breast_cancer" / "rows.json").read_text())
    body = {"inputs": [{"name": "input", "shape": [1, 30], "datatype": "FP64",
                        "data": rows[0]["features"]}]}
    url = container.url("oip", f"/v2/models/{MODEL}/infer")
    r = requests.post(url, json=body, timeout=30)
    assert (r.status_code, r.json()) == (401, UNAUTHORIZED)
    r = requests.post(url, json=body, timeout=30, headers={"Authorization": f"Bearer {KEY_1}"})
    assert r.status_code == 200, r.text
    labels = [o for o in r.json()["outputs"] if o["name"] == "label"][0]["data"]
    assert labels == [rows[0]["label"]]


def test_grpc_needs_a_known_key(container):
    target = f"127.0.0.1:{container.public['grpc']}"
    for key, status in ((None, 401), ("wrong-" + "x" * 30, 401), (KEY_1, 200)):
        with GrpcClient(target, key) as grpc:
            answer = grpc.predict(MODEL, benign_body(), "application/json")
        assert answer.status == status, (key, answer)
    assert answer.body["label"] == "benign"


@pytest.mark.parametrize("port", ["http", "oip", "metrics"])
def test_management_api_is_on_no_public_port(container, port):
    headers = {"Authorization": f"Bearer {KEY_1}"}
    for path in ("/models", f"/models/{MODEL}", "/api-description"):
        r = requests.get(container.url(port, path), headers=headers, timeout=10)
        assert r.status_code == 404, (port, path, r.text)
    r = requests.post(container.url(port, "/models?url=x.mar"), headers=headers, timeout=10)
    assert r.status_code == 404


def test_metrics_need_no_key(container):
    r = requests.get(container.url("metrics", "/metrics"), timeout=10)
    assert r.status_code == 200
    assert "ts_inference_requests_total" in r.text


# -- (b) key rotation without a restart -------------------------------------------------------
def test_keys_rotate_without_a_restart(container):
    pid = container.process.pid
    write_keys(container.keys_file, KEY_1, KEY_2)
    eventually(lambda: container.predict(KEY_2).status_code == 200)
    assert container.predict(KEY_1).status_code == 200
    write_keys(container.keys_file, KEY_2)
    eventually(lambda: container.predict(KEY_1).status_code == 401)
    assert container.predict(KEY_2).status_code == 200
    # A file with a bad key is refused, loudly, and the keys loaded before keep working.
    write_keys(container.keys_file, "short")
    eventually(lambda: "too short" in container.log())
    assert container.predict(KEY_2).status_code == 200
    write_keys(container.keys_file, KEY_1)
    eventually(lambda: container.predict(KEY_1).status_code == 200)
    container.wait_reloaded()  # no old worker left to answer the next test with the old keys
    assert container.process.pid == pid and container.process.poll() is None


# -- (c) SIGTERM drains -----------------------------------------------------------------------
def test_sigterm_drains_answers_in_flight_and_leaves_nothing(container):
    tree = container.tree()
    names = sorted({p.name() for p in tree})
    assert {"nginx", "java"} <= set(names), names
    container.wait_reloaded()
    with Load(container.public["http"]) as load, readiness_probes(container) as probes:
        time.sleep(1.0)
        signalled = time.monotonic()
        container.process.send_signal(signal.SIGTERM)
        in_flight = sum(1 for r in list(load.records) if r.answered is None and r.error is None)
        try:
            code = container.process.wait(timeout=GRACE_S + 5)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {GRACE_S + 5}s after SIGTERM:\n{container.log()}")
        exited = time.monotonic()
        time.sleep(0.3)  # keep sending after the exit: every one refused

    records = list(load.records)
    not_ready = next(p.at for p in probes if p.at >= signalled and p.status == 503)
    refused = [p.at for p in probes if p.status is None]
    refused += [r.started for r in records if r.error is not None]
    first_refused = min(refused)
    sent_before = [r for r in records if r.sent is not None and r.sent < not_ready]
    sent_during = [r for r in records if r.sent is not None and r.sent >= not_ready]
    figures = {
        "requests_in_flight_at_sigterm": in_flight,
        "sent_before_readiness_false": len(sent_before),
        "answered_200_of_those": sum(r.status == 200 for r in sent_before),
        "sent_while_draining": len(sent_during),
        "answered_200_while_draining": sum(r.status == 200 for r in sent_during),
        "answered_after_sigterm": sum(1 for r in records
                                      if r.answered and r.answered >= signalled),
        "refused_or_reset": sum(1 for r in records if r.error is not None),
        "readiness_false_after_s": round(not_ready - signalled, 3),
        "first_refusal_after_s": round(first_refused - signalled, 3),
        "exit_after_s": round(exited - signalled, 3),
        "exit_code": code,
        "not_200_before_sigterm": dict(Counter(f"{r.status or r.error}" for r in records
                                               if r.started < signalled and r.status != 200)),
    }
    print("\ndrain figures:", json.dumps(figures))
    log.info("drain figures: %s", figures)

    assert code == 0, container.log()
    assert exited - signalled <= GRACE_S
    assert not_ready < first_refused, (figures, container.log())
    # Listeners stayed open for the drain delay.
    assert first_refused - signalled >= DRAIN_DELAY_S - 0.1
    assert sent_before and all(r.status == 200 for r in sent_before), \
        [r for r in sent_before if r.status != 200]
    # Nothing of the tree is left: nginx, the JVM, the workers.
    alive = [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, alive


def test_a_dead_child_stops_the_container(tmp_path):
    """nginx gone: the entrypoint stops TorchServe and exits non-zero (the orchestrator
    restarts the container), leaving nothing behind."""
    box = Container(tmp_path)
    try:
        box.wait_ready()
        tree = box.tree()
        nginx_master = next(p for p in tree if p.name() == "nginx" and p.ppid() == box.process.pid)
        nginx_master.kill()
        code = box.process.wait(timeout=GRACE_S + 5)
    finally:
        box.kill()
    assert code == 1, box.log()
    assert "stopping the container" in box.log()
    assert not [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def accepts(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_not_ready_while_torchserve_takes_no_predictions(tmp_path):
    """TorchServe whose start failed on a port it binds after its REST ports (one taken by
    another process meanwhile) closes its REST listeners at once, then lives on for seconds,
    its workers loading and the OIP plugin answering: /ready must say no, or a load balancer
    sends clients to 502s (test_rolling_restart's flake: 1,637 of them). That state without
    the race: TorchServe's inference listener closed under it (ss -K, as root)."""
    if shutil.which("ss") is None:
        pytest.skip("no ss (iproute2) to close a listening socket with")
    box = Container(tmp_path)
    try:
        box.wait_ready()
        inference = contract.INTERNAL_PORTS.inference + box.offset
        subprocess.run(["ss", "-K", "-tln", "sport", "=", str(inference)], capture_output=True)
        if accepts(inference):
            pytest.skip("ss -K cannot close a listening socket here (needs root and a kernel "
                        "with CONFIG_INET_DIAG_DESTROY)")
        predicted = box.predict(KEY_1)
        ready, oip_ready = box.probe(contract.READY_PATH), box.probe("/v2/health/ready", "oip")
        alive = box.process.poll() is None
    finally:
        box.kill()
    assert (predicted.status_code, predicted.json()) == (
        502, {"error": "TorchServe is not answering", "code": 502})
    assert (ready, oip_ready, alive) == (503, 400, True), box.log()
