"""What Kiln's front proxy answers itself, and what it changes on the way to TorchServe: form
bodies decoded by Kiln's handler instead of TorchServe's decoder (which answered 500), a full
model queue answered at once with 503 and Retry-After, short JSON errors for what nginx
refuses."""

import concurrent.futures
import http.client
import io
import json
import socket
from collections import Counter
from pathlib import Path

import pytest
import requests
from PIL import Image

from kiln.deploy import front
from kiln.deploy.server import ModelServing, Ports, Server, ServerSettings
from kiln.handlers import oip
from kiln.handlers.errors import RETRY_AFTER_S
from kiln.workspace import Workspace

SEVEN = (Path(__file__).resolve().parents[1] / "fixtures" / "digits" / "7.png").read_bytes()


def auth(server):
    return {"Authorization": f"Bearer {server.keys()['inference']}"}


def predict(server, **kwargs):
    return requests.post(f"{server.url('inference')}/predictions/lenet", timeout=60, **kwargs)


def test_a_multipart_form_with_an_image_is_answered(server):
    r = predict(server, files={"data": ("7.png", SEVEN, "image/png")}, headers=auth(server))
    assert (r.status_code, r.json()["label"]) == (200, "7")


def test_a_client_cannot_pick_the_handlers_oip_decoder(server):
    """kiln-protocol is the OIP plugin's mark on what it hands a worker; a REST request that
    carries it is still a REST request (it was decoded as OIP framing: a 400)."""
    r = predict(server, data=SEVEN, headers={**auth(server), "Content-Type": "image/png",
                                             oip.PROTOCOL_HEADER: oip.PROTOCOL})
    assert (r.status_code, r.json()["label"]) == (200, "7")


def test_json_sent_as_curls_default_form_type_is_answered(server):
    pixels = [[0] * 28] * 28
    r = predict(server, data=f'{{"instances": [{pixels}]}}'.encode(), headers={
        **auth(server), "Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200 and isinstance(r.json(), list), r.text


@pytest.mark.parametrize("body, content_type, error", [
    # Each of these was a 500 from TorchServe's own form decoder.
    (b"=", "application/x-www-form-urlencoded",
     "expected the request body or a form field named 'data', got fields: ''"),
    (b"--0--\r\n", "multipart/form-data; boundary=", "multipart/form-data needs a boundary"),
    (b"\x00\xff garbage", "multipart/form-data; boundary=xyz",
     "a multipart body without its boundary"),
    (b"--b\r\nContent-Disposition: form-data; name=data\r\n\r\nnot an image\r\n--b--\r\n",
     "multipart/form-data; boundary=b", "not a PNG or JPEG image and not JSON"),
])
def test_malformed_forms_are_a_400_naming_the_problem(server, body, content_type, error):
    r = predict(server, data=body, headers={**auth(server), "Content-Type": content_type})
    assert r.status_code == 400, r.text
    assert r.json()["error"].startswith(error)


def raw_request(server, request: bytes) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", server.ports.inference), timeout=30) as s:
        s.sendall(request)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


@pytest.mark.parametrize("request_line, status, error", [
    (b"get /predictions/lenet HTTP/1.1", 400, "bad request"),
    (b"GET /.. HTTP/1.1", 400, "bad request"),
    (b"TRACE /predictions/lenet HTTP/1.1", 405, "method not allowed"),
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1", 414, "the request line is too long"),
    # TorchServe reads request lines of up to 4 KB: a longer one got its own error text.
    (b"GET /predictions/lenet/" + b"a" * 5000 + b" HTTP/1.1", 414,
     "the path with its query is longer than 4000 characters"),
    (b"POST /predictions/lenet HTTP/1.1\r\nTransfer-Encoding: chunked, identity", 501,
     "the transfer encoding is not supported: send Content-Length or chunked"),
])
def test_what_nginx_refuses_is_a_short_json_error(server, request_line, status, error):
    assert raw_request(server, request_line + b"\r\nHost: x\r\nConnection: close\r\n\r\n") == (
        status, f'{{"error": "{error}", "code": {status}}}\n'.encode())


def test_unknown_keys_are_limited_per_client_and_known_keys_are_not(server):
    """A flood of requests without a known key gets 401s up to the burst, then 429s with
    Retry-After; a known key from the same address is answered all along."""
    statuses, known = Counter(), []
    conn = http.client.HTTPConnection("127.0.0.1", server.ports.inference, timeout=30)
    try:
        for i in range(400):
            conn.request("GET", "/predictions/lenet", headers={"Authorization": "Bearer nope"})
            reply = conn.getresponse()
            body = reply.read()
            statuses[reply.status] += 1
            if reply.status == 429:
                too_many = (reply.getheader("Retry-After"), json.loads(body))
            if i % 50 == 0:
                known.append(predict(server, data=SEVEN, headers=auth(server)).status_code)
    finally:
        conn.close()
    assert set(statuses) == {401, 429}, statuses
    assert statuses[401] > front.REFUSED_KEY_BURST, statuses
    assert too_many == (str(RETRY_AFTER_S), {"error": front.TOO_MANY_REFUSED, "code": 429})
    assert known == [200] * 8
    # The allowance comes back: the next tests' 401s are 401s again.
    while requests.get(f"{server.url('inference')}/ping/x", timeout=30).status_code == 429:
        pass


def test_too_many_headers_and_too_large_a_body_get_431_and_413(server):
    headers = {**auth(server), **{f"x-h{i}": "v" * 200 for i in range(200)}}
    r = predict(server, data=SEVEN, headers=headers)
    assert (r.status_code, r.json()["code"]) == (431, 431)
    r = predict(server, data=b"0" * (server.settings.max_request_size + 1), headers=auth(server))
    assert r.json() == {"error": f"the request body is larger than "
                                 f"{server.settings.max_request_size} bytes", "code": 413}


@pytest.fixture(scope="module")
def one_slot(archives, tmp_path_factory):
    """lenet with one worker, batches of one and room for two waiting requests."""
    srv = Server(ServerSettings(
        run_dir=tmp_path_factory.mktemp("queue"), model_store=Workspace.current().model_store,
        models=["lenet"],
        ports=Ports.free(), internal_ports=Ports.free(), job_queue_size=2,
        serving={"lenet": ModelServing(workers=1, batch_size=1, max_batch_delay_ms=1)}))
    with srv.running(timeout=240):
        yield srv


def largest_legal_png() -> bytes:
    out = io.BytesIO()
    Image.new("L", (4096, 4096)).save(out, format="PNG")
    return out.getvalue()


def test_a_full_queue_is_a_503_with_retry_after_at_once(one_slot):
    big = largest_legal_png()
    oip_body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 28, 28],
                            "data": [0.0] * 784}]}

    def rest():
        r = predict(one_slot, data=big, headers={**auth(one_slot), "Content-Type": "image/png"})
        return "rest", r.status_code, r.headers.get("Retry-After"), r.json()

    def oip():
        r = requests.post(f"{one_slot.url('oip')}/v2/models/lenet/infer", json=oip_body,
                          headers=auth(one_slot), timeout=60)
        return "oip", r.status_code, r.headers.get("Retry-After"), r.json()

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda f: f(), [rest] * 12 + [oip] * 4))
    refused = [a for a in answers if a[1] == 503]
    assert refused, answers
    assert {a[1] for a in answers} <= {200, 503}, answers
    for _, _, retry_after, body in refused:
        assert retry_after == "1" and body["code"] == 503
    assert any(a[1] == 200 for a in answers)
    # And the model answers as before.
    r = predict(one_slot, data=SEVEN, headers=auth(one_slot))
    assert (r.status_code, r.json()["label"]) == (200, "7")
