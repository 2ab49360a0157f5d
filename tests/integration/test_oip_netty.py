"""The OIP plugin's HTTP server as a hostile or demanding client meets it: limits answered with
their status instead of a dropped connection, read deadlines, a connection bound, keep-alive
and pipelining, and the binary tensor data extension as tritonclient speaks it."""

import json
import select
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.http as triton
from PIL import Image

from kiln.deploy.server import HOST, Ports, Server, ServerSettings
from kiln.model_store.build import ensure_built
from kiln.workspace import Workspace

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
DIGITS = [str(d) for d in range(10)]
# The dedicated server's bounds, small enough to reach in a test.
READ_TIMEOUT_S = 2
IDLE_TIMEOUT_S = 5
MAX_CONNECTIONS = 8
MAX_BYTES_IN_FLIGHT = 1_000_000


class TightSettings(ServerSettings):
    """Server settings plus JVM properties for the OIP plugin's bounds."""

    def __init__(self, *args, jvm_properties, **kwargs):
        super().__init__(*args, **kwargs)
        self.jvm_properties = jvm_properties

    def config_properties(self):
        extra = " ".join(f"-D{k}={v}" for k, v in self.jvm_properties.items())
        lines = super().config_properties().splitlines(keepends=True)
        return "".join(f"{line.rstrip()} {extra}\n" if line.startswith("vmargs=") else line
                       for line in lines)


@pytest.fixture(scope="module")
def tight(tmp_path_factory):
    """A server of its own with short read and idle timeouts and a small connection bound."""
    ensure_built("binary")
    settings = TightSettings(run_dir=tmp_path_factory.mktemp("tight"),
                             model_store=Workspace.current().model_store,
                             models=["binary"], ports=Ports.free(),
                             jvm_properties={"kiln.oip.read_timeout_s": READ_TIMEOUT_S,
                                             "kiln.oip.idle_timeout_s": IDLE_TIMEOUT_S,
                                             "kiln.oip.max_connections": MAX_CONNECTIONS,
                                             "kiln.oip.max_bytes_in_flight":
                                                 MAX_BYTES_IN_FLIGHT})
    with Server(settings).running(timeout=240) as srv:
        yield srv


def plugin_url(server):
    """Where the plugin itself listens: behind the front proxy when the server has one (the
    proxy has limits of its own; these tests are about the plugin's)."""
    internal = getattr(server.settings, "internal_ports", None)
    if internal is None:
        return server.url("oip")
    return f"http://{HOST}:{internal.oip}"


def address(server):
    host, port = plugin_url(server).split("://", 1)[1].rsplit(":", 1)
    return host, int(port)


def token(server):
    """The plugin's token: TorchServe's own inference token."""
    if getattr(server.settings, "internal_ports", None) is None:
        return server.keys()["inference"]
    return server.torchserve_keys()["inference"]


def request(line, token_, headers="", body=b""):
    """One raw HTTP/1.1 request; `headers`: extra header lines, each ending in CRLF."""
    head = f"{line} HTTP/1.1\r\nHost: kiln\r\nAuthorization: Bearer {token_}\r\n{headers}\r\n"
    return head.encode() + body


def read_response(reader):
    """(status, headers with lower-case names, body) of the next response on a connection."""
    status_line = reader.readline()
    assert status_line.startswith(b"HTTP/1.1 "), status_line
    headers = {}
    while (line := reader.readline()) not in (b"\r\n", b""):
        name, value = line.decode().split(":", 1)
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, reader.read(int(headers["content-length"]))


def exchange(server, data, more=(), to=None):
    """Sends data (then each of `more` while the server reads), returns the one response and
    what came after it before the server closed. `to`: (host, port), the plugin's if None."""
    with socket.create_connection(to or address(server), timeout=30) as sock:
        sock.sendall(data)
        for piece in more:
            sock.sendall(piece)
        with sock.makefile("rb") as reader:
            status, headers, body = read_response(reader)
            return status, headers, json.loads(body), reader.read()


def error(code, message):
    return {"error": message, "code": code}


# --- limits answered with their status ---------------------------------------------------


def test_more_than_a_hundred_headers_get_431(server):
    pads = "".join(f"X-Pad-{i}: 1\r\n" for i in range(201))
    status, headers, body, rest = exchange(server, request("GET /v2/health/live", token(server),
                                                           pads))
    assert (status, body) == (431, error(431, "the request has more than 100 headers"))
    assert (headers["connection"], rest) == ("close", b"")


def pads(count):
    return "".join(f"X-Pad-{i}: 1\r\n" for i in range(count))


@pytest.mark.parametrize("with_key", [True, False])
def test_a_hundred_headers_pass_the_front_proxy(server, with_key):
    """nginx sets Host and Authorization (TorchServe's token) on what it forwards, whether the
    client sent them or not: a client's own 100 headers reached the plugin as 101."""
    auth = f"Authorization: Bearer {server.keys()['inference']}\r\n" if with_key else ""
    line = f"GET /v2/health/live HTTP/1.1\r\nHost: kiln\r\n{auth}"
    hundred = (line + pads(99 - with_key) + "\r\n").encode()
    with socket.create_connection((HOST, server.ports.oip), timeout=30) as sock:
        sock.sendall(hundred)
        with sock.makefile("rb") as reader:
            assert read_response(reader)[::2] == (200, b'{"live":true}')


def test_more_than_a_hundred_headers_besides_host_and_authorization_get_431(server):
    line = "GET /v2/health/live HTTP/1.1\r\nHost: kiln\r\n"
    sent = (line + pads(101) + "Connection: close\r\n\r\n").encode()
    status, _, body, _ = exchange(server, sent, to=(HOST, server.ports.oip))
    assert (status, body) == (431, error(431, "the request has more than 100 headers"))


def test_one_huge_header_gets_431(server):
    big = "X-Big: " + "a" * 20_000 + "\r\n"
    status, _, body, rest = exchange(server, request("GET /v2/health/live", token(server), big))
    assert (status, body, rest) == (
        431, error(431, "the request's headers are over 16384 bytes"), b"")


def test_a_too_long_uri_gets_414(server):
    status, _, body, _ = exchange(server, request("GET /v2/" + "a" * 10_000, token(server)))
    assert (status, body) == (414, error(414, "the request line (its URI) is over 8192 bytes"))


def test_a_malformed_request_gets_400(server):
    status, _, body, _ = exchange(server, request("POST /v2/models/binary/infer", token(server),
                                                  "Content-Length: many\r\n"))
    assert (status, body) == (400, error(400, 'malformed HTTP request: For input string: "many"'))


def too_large(server):
    limit = server.settings.max_request_size
    return error(413, f"the request body is over max_request_size ({limit} bytes)")


def test_a_content_length_over_the_limit_gets_413_before_its_body(server):
    length = server.settings.max_request_size + 1
    status, headers, body, rest = exchange(server, request(
        "POST /v2/models/binary/infer", token(server), f"Content-Length: {length}\r\n"))
    assert (status, body, headers["connection"], rest) == (413, too_large(server), "close", b"")


def test_a_chunked_body_over_the_limit_gets_413(server):
    chunk = b"10000\r\n" + b"a" * 0x10000 + b"\r\n"
    chunks = server.settings.max_request_size // 0x10000 + 1
    status, _, body, _ = exchange(
        server, request("POST /v2/models/binary/infer", token(server),
                        "Transfer-Encoding: chunked\r\n"),
        more=[chunk] * chunks + [b"0\r\n\r\n"])
    assert (status, body) == (413, too_large(server))


def test_request_bodies_past_the_bytes_in_flight_bound_get_503(tight):
    """A body's bytes are taken from the bound when its head arrives: the 100 Continue says
    the first one holds them; the second finds no room, until the first is answered."""
    size = MAX_BYTES_IN_FLIGHT // 2 + 1
    head = request("POST /v2/models/binary/infer", token(tight),
                   f"Content-Type: application/json\r\nContent-Length: {size}\r\n"
                   "Expect: 100-continue\r\n")
    for _ in range(2):  # the second time, what the first request held was given back
        with socket.create_connection(address(tight), timeout=30) as first:
            with first.makefile("rb") as reader:
                first.sendall(head)
                assert (reader.readline(), reader.readline()) == (
                    b"HTTP/1.1 100 Continue\r\n", b"\r\n")
                status, headers, body, rest = exchange(tight, head)
                assert (status, body) == (503, error(503, f"the server holds "
                                          f"{MAX_BYTES_IN_FLIGHT} bytes of requests, its "
                                          "limit: try again later"))
                assert (headers["retry-after"], headers["connection"], rest) == (
                    "1", "close", b"")
                first.sendall(b" " * size)
                status, _, body = read_response(reader)
                assert (status, json.loads(body)) == (400, error(400, "empty body"))


# --- deadlines and the connection bound ---------------------------------------------------


def open_connection(server, deadline_s=30):
    """A connection that has been answered once (GET /v2/health/live), so that the server
    counts it; retried while the server is still at its bound from connections just closed."""
    deadline = time.monotonic() + deadline_s
    while True:
        sock = socket.create_connection(address(server), timeout=30)
        sock.sendall(request("GET /v2/health/live", token(server)))
        reader = sock.makefile("rb")
        status, _, _ = read_response(reader)
        if status == 200:
            return sock, reader
        reader.close()
        sock.close()
        assert status == 503 and time.monotonic() < deadline
        time.sleep(0.1)


def test_connections_over_the_bound_get_503_and_close(tight):
    held = [open_connection(tight) for _ in range(MAX_CONNECTIONS)]
    try:
        status, headers, body, rest = exchange(tight, request("GET /v2/health/live",
                                                              token(tight)))
        assert (status, body) == (503, error(503, f"the server has {MAX_CONNECTIONS} "
                                             "connections open, its limit: try again later"))
        assert (headers["retry-after"], headers["connection"], rest) == ("1", "close", b"")
        # The held connections still answer.
        sock, reader = held[0]
        sock.sendall(request("GET /v2/health/live", token(tight)))
        assert read_response(reader)[::2] == (200, b'{"live":true}')
    finally:
        for sock, reader in held:
            reader.close()  # the socket closes with the last of its files
            sock.close()
    # Once they are closed, new connections are served again.
    sock, reader = open_connection(tight)
    reader.close()
    sock.close()


def test_a_client_trickling_headers_gets_408(tight):
    sock, reader = open_connection(tight)
    with sock, reader:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\n")
        for _ in range(200):  # one header line every 0.1 s until the server answers
            if select.select([sock], [], [], 0.1)[0]:
                break
            sock.sendall(b"X-Slow: 1\r\n")
        status, headers, body = read_response(reader)
        assert (status, json.loads(body), headers["connection"]) == (
            408, error(408, f"the request was not complete within {READ_TIMEOUT_S} s"), "close")


def test_an_idle_keep_alive_connection_is_closed(tight):
    sock, reader = open_connection(tight)
    with sock, reader:
        sock.settimeout(IDLE_TIMEOUT_S * 6)
        assert reader.read() == b""  # closed by the server, without a word


def test_health_answers_while_64_slow_connections_are_held(server):
    half_sent = request("POST /v2/models/binary/infer", token(server),
                        "Content-Type: application/json\r\nContent-Length: 100\r\n", b'{"in')
    slow = []
    try:
        for _ in range(64):
            sock = socket.create_connection(address(server), timeout=30)
            sock.sendall(half_sent)
            slow.append(sock)
        headers = {"Authorization": f"Bearer {token(server)}"}
        base = f"{plugin_url(server)}/v2"
        for path in ("/health/live", "/health/ready", "/models/lenet/ready"):
            r = requests.get(base + path, headers=headers, timeout=10)
            assert r.status_code == 200, (path, r.text)
        rows = cancer_rows()[:1]
        r = requests.post(f"{base}/models/binary/infer", headers=headers, timeout=30,
                          json={"inputs": [features(rows)]})
        assert r.json()["outputs"][1]["data"] == [rows[0]["label"]]
    finally:
        for sock in slow:
            sock.close()


# --- keep-alive and pipelining ---------------------------------------------------------------


def cancer_rows():
    return json.loads((FIXTURES / "breast_cancer" / "rows.json").read_text())


def features(rows):
    return {"name": "input", "shape": [len(rows), 30], "datatype": "FP64",
            "data": [row["features"] for row in rows]}


def test_200_requests_on_one_keep_alive_connection(server):
    rows = cancer_rows()
    with socket.create_connection(address(server), timeout=30) as sock:
        reader = sock.makefile("rb")
        for i in range(200):
            row = rows[i % len(rows)]
            body = json.dumps({"id": str(i), "inputs": [features([row])]}).encode()
            sock.sendall(request("POST /v2/models/binary/infer", token(server),
                                 f"Content-Type: application/json\r\n"
                                 f"Content-Length: {len(body)}\r\n", body))
            status, headers, answer = read_response(reader)
            answer = json.loads(answer)
            assert (status, "connection" in headers) == (200, False)
            assert (answer["id"], answer["outputs"][1]["data"]) == (str(i), [row["label"]])


def test_pipelined_requests_are_answered_in_order(server):
    rows = cancer_rows()[:2]
    body = json.dumps({"inputs": [features(rows)]}).encode()
    infer = request("POST /v2/models/binary/infer", token(server),
                    f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n", body)
    live = request("GET /v2/health/live", token(server))
    nope = request("GET /v2/models/nope", token(server), "Connection: close\r\n")
    with socket.create_connection(address(server), timeout=30) as sock:
        sock.sendall(infer + live + infer + nope)
        reader = sock.makefile("rb")
        answers = [read_response(reader) for _ in range(4)]
        assert reader.read() == b""  # closed after the request that asked for it
    labels = [row["label"] for row in rows]
    assert [a[0] for a in answers] == [200, 200, 200, 404]
    assert json.loads(answers[0][2])["outputs"][1]["data"] == labels
    assert json.loads(answers[1][2]) == {"live": True}
    assert json.loads(answers[2][2])["outputs"][1]["data"] == labels
    assert json.loads(answers[3][2]) == error(404, "no model 'nope'")
    assert answers[3][1]["connection"] == "close"


# --- the binary tensor data extension ------------------------------------------------------


@pytest.fixture(scope="module")
def triton_client(server):
    return triton.InferenceServerClient(plugin_url(server).split("://", 1)[1])


def auth(server):
    # A fresh dict each call: tritonclient adds its own headers to the one it is given.
    return {"Authorization": f"Bearer {token(server)}"}


def json_outputs(server, model, tensor):
    r = requests.post(f"{plugin_url(server)}/v2/models/{model}/infer", headers=auth(server),
                      json={"inputs": [tensor]}, timeout=30)
    assert r.status_code == 200, r.text
    return {o["name"]: o for o in r.json()["outputs"]}


def test_binary_image_tensors_answer_as_json_ones_do(server, triton_client):
    pixels = np.stack([np.asarray(Image.open(FIXTURES / "digits" / f"{d}.png")) for d in DIGITS])
    pixels = pixels.astype(np.float32)
    tensor = triton.InferInput("input", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels)  # binary by default
    result = triton_client.infer("lenet", [tensor], headers=auth(server))
    expected = json_outputs(server, "lenet", {"name": "input", "shape": [10, 28, 28],
                                              "datatype": "FP32",
                                              "data": pixels.ravel().tolist()})
    np.testing.assert_array_equal(
        result.as_numpy("probabilities"),
        np.array(expected["probabilities"]["data"], dtype=np.float32).reshape(10, 10))
    assert result.as_numpy("label").tolist() == [d.encode() for d in DIGITS]
    # Every output came back binary: the JSON part holds sizes, not data.
    outputs = result.get_response()["outputs"]
    assert [o["parameters"] for o in outputs] == [{"binary_data_size": 400},
                                                  {"binary_data_size": 50}]


def test_binary_feature_tensors_answer_as_json_ones_do(server, triton_client):
    rows = cancer_rows()
    values = np.array([row["features"] for row in rows], dtype=np.float64)
    tensor = triton.InferInput("input", list(values.shape), "FP64")
    tensor.set_data_from_numpy(values)
    wanted = [triton.InferRequestedOutput("label", binary_data=True),
              triton.InferRequestedOutput("probabilities", binary_data=False)]
    result = triton_client.infer("binary", [tensor], outputs=wanted, headers=auth(server))
    expected = json_outputs(server, "binary", features(rows))
    assert result.as_numpy("label").tolist() == [row["label"].encode() for row in rows]
    assert result.as_numpy("label").tolist() == [v.encode() for v in expected["label"]["data"]]
    assert result.get_output("probabilities")["data"] == expected["probabilities"]["data"]
    assert "data" not in result.get_output("label")


def post_raw(server, body, json_length, model="binary"):
    headers = {**auth(server), "Inference-Header-Content-Length": str(json_length)}
    r = requests.post(f"{plugin_url(server)}/v2/models/{model}/infer", data=body,
                      headers=headers, timeout=30)
    return r.status_code, r.json()


def binary_request(size, shape=(1, 30), datatype="FP32"):
    return json.dumps({"inputs": [{"name": "input", "shape": list(shape), "datatype": datatype,
                                   "parameters": {"binary_data_size": size}}]}).encode()


HEAD = binary_request(120)  # 110 bytes of JSON for 120 bytes of [1, 30] FP32


@pytest.mark.parametrize(("body", "json_length", "message"), [
    (HEAD + bytes(120), 999, "Inference-Header-Content-Length is 999, but the body has only "
     "230 bytes"),
    (HEAD + bytes(120), -1, "Inference-Header-Content-Length must be a whole number >= 0, "
     "got '-1'"),
    (HEAD + bytes(100), len(HEAD), "the inputs' binary_data_size add up to 120 bytes, but 100 "
     "bytes follow the 110-byte JSON header"),
    (binary_request(100) + bytes(100), len(binary_request(100)), "input 'input' of shape "
     "[1,30] and datatype FP32 takes 120 bytes, but its binary_data_size is 100"),
    (binary_request(-1), len(binary_request(-1)),
     "input 'input' binary_data_size must be a whole number >= 0, got -1"),
    (binary_request(120, datatype="TEXT") + bytes(120), len(binary_request(120, datatype="TEXT")),
     'input \'input\' has datatype "TEXT", which has no binary form'),
    (b'{"inputs": [' + bytes(10), 12, "the request's JSON is not valid: java.io.EOFException: "
     "End of input at line 1 column 13 path $.inputs[0]"),
])  # fmt: skip
def test_bad_binary_framing_gets_400_naming_the_problem(server, body, json_length, message):
    assert len(HEAD) == 110
    assert post_raw(server, body, json_length) == (400, error(400, message))


@pytest.mark.parametrize(("shape", "message"), [
    ([513, 28, 28], "513 instances in one request, more than 512"),
    ([512, 2049], "1049088 input values in one request, more than the limit of 1048576: "
     "send fewer rows"),
])  # fmt: skip
def test_binary_inputs_over_the_handlers_limits_get_413_from_their_header(server, shape,
                                                                          message):
    head = binary_request(int(np.prod(shape)), shape, "UINT8")
    assert post_raw(server, head + bytes(int(np.prod(shape))), len(head), "lenet") == (
        413, error(413, message))


def test_binary_values_are_checked_as_json_ones_are(server):
    values = np.zeros((1, 30), dtype="<f4")
    values[0, 29] = np.nan
    assert post_raw(server, HEAD + values.tobytes(), len(HEAD)) == (
        400, error(400, "input 'input' value at [29] is not a finite number: NaN"))
