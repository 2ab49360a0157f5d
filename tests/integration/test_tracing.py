"""One request, followed (issue 19, goal 1): the front proxy's request id on every answer of
every inference port, errors included; the W3C trace context with the proxy's span as the
handler's parent; Server-Timing on REST and OIP answers; Kiln's JSON access log."""

import json
import re
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import pytest
import requests

from kiln.deploy import front
from kiln.deploy.server import Ports, Server, ServerSettings
from kiln.grpc_client import load_stubs
from kiln.handlers import tracing
from kiln.workspace import Workspace

SEVEN = (Path(__file__).resolve().parents[1] / "fixtures" / "digits" / "7.png").read_bytes()
MADE_ID = re.compile(r"[0-9a-f]{32}")  # nginx's $request_id
CALLER = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
TIMING = re.compile(r"queue;dur=(?P<queue>[0-9.]+), preprocess;dur=(?P<preprocess>[0-9.]+), "
                    r"inference;dur=(?P<inference>[0-9.]+), postprocess;dur=(?P<postprocess>"
                    r"[0-9.]+), traceparent;desc=\"(?P<traceparent>[^\"]+)\"")
BINARY_ROW = {"inputs": [{"name": "input", "shape": [1, 30], "datatype": "FP32",
                          "data": [0.0] * 30}]}


@pytest.fixture(scope="module")
def traced(archives, tmp_path_factory):
    srv = Server(ServerSettings(run_dir=tmp_path_factory.mktemp("traced"),
                                model_store=Workspace.current().model_store,
                                models=["lenet", "binary"], ports=Ports.free(),
                                internal_ports=Ports.free(), access_log=True))
    with srv.running(timeout=180):
        yield srv


def key(server):
    return {"Authorization": f"Bearer {server.keys()['inference']}"}


def rest(server, request_id=None, headers=None, path="/predictions/lenet", data=SEVEN,
         keyed=True):
    sent = {"Content-Type": "image/png", **(key(server) if keyed else {}), **(headers or {})}
    if request_id is not None:
        sent["X-Request-ID"] = request_id
    return requests.post(server.url("inference") + path, data=data, headers=sent, timeout=60)


def oip(server, request_id=None, headers=None, model="binary", body=None, keyed=True):
    sent = {**(key(server) if keyed else {}), **(headers or {})}
    if request_id is not None:
        sent["X-Request-ID"] = request_id
    return requests.post(f"{server.url('oip')}/v2/models/{model}/infer",
                         json=BINARY_ROW if body is None else body, headers=sent, timeout=60)


# Each of the answers below, whoever makes it: the handler (200, 400), TorchServe or the
# plugin (404 of an unknown model), nginx (401, 404 of an unknown route, 413).
REST_CASES = {
    "200": (dict(), 200),
    "400 handler": (dict(data=b"not an image"), 400),
    "401 no key": (dict(keyed=False), 401),
    "404 no model": (dict(path="/predictions/nosuchmodel"), 404),
    "404 no route": (dict(path="/nowhere"), 404),
    "413 too large": (dict(data=b"x" * (7 * 2**20)), 413),
}
OIP_CASES = {
    "200": (dict(), 200),
    "400 handler": (dict(body={"inputs": []}), 400),
    "401 no key": (dict(keyed=False), 401),
    "404 no model": (dict(model="nosuchmodel"), 404),
}
IDS = {  # the client's id: what comes back (None: one nginx made)
    "valid": ("client-42.a:b_C", "client-42.a:b_C"),
    "64 characters": ("a" * 64, "a" * 64),
    "oversized": ("a" * 65, None),
    "bad characters": ("id with spaces", None),
    "injection": ("id\"},{\"x", None),
    "none": (None, None),
}


def assert_request_id(answer, sent, expected):
    got = answer.headers.get("X-Request-ID")
    if expected is None:
        assert MADE_ID.fullmatch(got or ""), got
        assert got != sent
    else:
        assert got == expected
    assert answer.raw.headers.getlist("X-Request-ID") == [got]  # one, never TorchServe's too


ANSWERS = {f"{send.__name__} {case}": (send, *cases[case])
           for send, cases in ((rest, REST_CASES), (oip, OIP_CASES)) for case in cases}


@pytest.mark.parametrize("answer", ANSWERS)
@pytest.mark.parametrize("id_case", IDS)
def test_rest_and_oip_answers_carry_the_request_id(traced, answer, id_case):
    send, kwargs, status = ANSWERS[answer]
    sent, expected = IDS[id_case]
    r = send(traced, sent, **kwargs)
    assert r.status_code == status, r.text
    assert_request_id(r, sent, expected)


@pytest.fixture(scope="module")
def stubs(tmp_path_factory):
    return load_stubs(tmp_path_factory.mktemp("grpc-stubs"))


def grpc_call(server, stubs, model, metadata):
    pb2, pb2_grpc = stubs
    with grpc.insecure_channel(f"127.0.0.1:{server.ports.grpc_inference}") as channel:
        stub = pb2_grpc.InferenceAPIsServiceStub(channel)
        request = pb2.PredictionsRequest(model_name=model, input={"data": SEVEN})
        try:
            _, call = stub.Predictions.with_call(request, metadata=metadata, timeout=60)
            return "OK", dict(call.initial_metadata()) | dict(call.trailing_metadata())
        except grpc.RpcError as err:
            return err.code().name, dict(err.initial_metadata()) | dict(err.trailing_metadata())


@pytest.mark.parametrize("keyed, model, code", [(True, "lenet", "OK"),
                                                (False, "lenet", "UNAUTHENTICATED"),
                                                (True, "nosuchmodel", "NOT_FOUND")])
@pytest.mark.parametrize("id_case", IDS)
def test_grpc_answers_carry_the_request_id_as_metadata(traced, stubs, keyed, model, code, id_case):
    sent, expected = IDS[id_case]
    metadata = [("x-request-id", sent)] if sent is not None else []
    if keyed:
        metadata.append(("authorization", key(traced)["Authorization"]))
    got_code, got = grpc_call(traced, stubs, model, metadata)
    assert got_code == code
    if expected is None:
        assert MADE_ID.fullmatch(got.get("x-request-id", "")), got
    else:
        assert got.get("x-request-id") == expected


def timing(answer):
    match = TIMING.fullmatch(answer.headers.get("Server-Timing", ""))
    assert match, answer.headers.get("Server-Timing")
    return match


def access_line(server, request_id, timeout=10):
    """The access log's line of `request_id`: nginx writes it once the answer is sent, so wait
    for it to be there."""
    deadline = time.monotonic() + timeout
    while True:
        path = server.access_log
        lines = path.read_text().splitlines() if path.exists() else []
        found = [json.loads(line) for line in lines
                 if json.loads(line)["request_id"] == request_id]
        if found or time.monotonic() > deadline:
            assert len(found) == 1, (request_id, lines[-5:])
            return found[0]
        time.sleep(0.05)


@pytest.mark.parametrize("send", [rest, oip], ids=["rest", "oip"])
def test_the_handler_sees_the_proxys_span_as_parent(traced, send):
    r = send(traced, f"traced-{send.__name__}", headers={"traceparent": CALLER})
    assert r.status_code == 200, r.text
    _, trace, parent, flags = timing(r)["traceparent"].split("-")
    assert (trace, flags) == (CALLER.split("-")[1], "01")
    assert parent != CALLER.split("-")[2]  # the proxy's span, not the caller's
    line = access_line(traced, f"traced-{send.__name__}")
    assert (line["trace_id"], line["span_id"], line["parent_span_id"]) == (
        trace, parent, CALLER.split("-")[2])


@pytest.mark.parametrize("bad", [
    "garbage",
    CALLER.upper(),  # hex is lowercase
    CALLER + "-extra",  # version 00 has four fields
    "01" + CALLER[2:],  # a version Kiln does not read
    "00-" + "0" * 32 + "-00f067aa0ba902b7-01",  # an all-zero trace id is invalid
    "00-4bf92f3577b34da6a3ce929d0e0e4736-" + "0" * 16 + "-01",  # so is an all-zero span id
    CALLER + "0" * 1000,  # oversized
])
def test_a_malformed_traceparent_is_replaced(traced, bad):
    r = rest(traced, headers={"traceparent": bad})
    assert r.status_code == 200, r.text
    _, trace, parent, flags = timing(r)["traceparent"].split("-")
    # A fresh sampled trace, whose id is the request id nginx made.
    assert (trace, flags) == (r.headers["X-Request-ID"], "01")
    assert trace not in bad and parent not in bad
    assert not any(bad in value for value in r.headers.values())


@pytest.mark.parametrize("send", [rest, oip], ids=["rest", "oip"])
def test_server_timing_has_four_stages_within_the_clients_latency(traced, send):
    for _ in range(20):
        started = time.perf_counter()
        r = send(traced)
        latency_ms = (time.perf_counter() - started) * 1000
        assert r.status_code == 200, r.text
        stages = timing(r)
        durations = [float(stages[name])
                     for name in ("queue", "preprocess", "inference", "postprocess")]
        assert all(d >= 0 for d in durations), durations
        assert sum(durations) <= latency_ms, (durations, latency_ms)


def test_a_bad_requests_answer_has_server_timing_too(traced):
    r = rest(traced, data=b"not an image")
    assert r.status_code == 400
    assert float(timing(r)["inference"]) == 0.0


@pytest.mark.parametrize("send, route, model, version", [
    (rest, "/predictions/lenet", "lenet", "1.0"),
    # The route is the path without the query; a pinned version's path names its model too.
    (lambda server, rid: rest(server, rid, path="/predictions/lenet?seen=1"),
     "/predictions/lenet", "lenet", "1.0"),
    (lambda server, rid: rest(server, rid, path="/predictions/lenet/1.0"),
     "/predictions/lenet/1.0", "lenet", "1.0"),
    (oip, "/v2/models/binary/infer", "binary", "1.0"),
], ids=["rest", "rest query", "rest pinned", "oip"])
def test_the_access_log_line_of_a_request(traced, send, route, model, version):
    request_id = f"logged-{model}-{len(route)}-{uuid.uuid4().hex[:8]}"
    r = send(traced, request_id)
    assert r.status_code == 200, r.text
    line = access_line(traced, request_id)
    assert {k: line[k] for k in ("request_id", "model", "version", "route", "status",
                                 "batch_size", "reason", "method")} == {
        "request_id": request_id, "model": model, "version": version, "route": route,
        "status": 200, "batch_size": 1, "reason": "", "method": "POST"}
    assert line["bytes"] == len(r.content)
    assert line["latency_s"] >= 0


@pytest.mark.parametrize("kwargs, status, reason", [
    (dict(data=b"not an image"), 400, "not_image_or_json"),
    (dict(keyed=False), 401, "missing_or_unknown_key"),
    (dict(path="/nowhere"), 404, "no_such_route"),
    (dict(data=b"x" * (7 * 2**20)), 413, "body_too_large"),
], ids=["400", "401", "404", "413"])
def test_the_access_log_says_why_a_4xx(traced, kwargs, status, reason):
    request_id = f"refused-{status}"
    r = rest(traced, request_id, **kwargs)
    assert r.status_code == status
    line = access_line(traced, request_id)
    assert (line["status"], line["reason"]) == (status, reason)


def test_torchserve_writes_no_second_access_log_behind_the_proxy(traced):
    assert rest(traced, "logged-once").status_code == 200
    access_line(traced, "logged-once")  # written once the answer is sent, after TorchServe's
    torchserve_s = traced.log_dir / "access_log.log"
    assert not torchserve_s.exists() or torchserve_s.read_text() == ""


def test_the_access_log_is_owner_only(traced):
    rest(traced, "owner-only")
    access_line(traced, "owner-only")
    assert traced.access_log.stat().st_mode & 0o777 == 0o600


class Receiver(ThreadingHTTPServer):
    """An OTLP/HTTP trace receiver (the official protobufs, opentelemetry-proto): the spans it
    was sent, by trace id."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), ReceiverHandler)
        self.spans = []
        self.lock = threading.Lock()

    @property
    def endpoint(self):
        return f"http://127.0.0.1:{self.server_address[1]}"

    def trace(self, trace_id, names, timeout=30):
        """The spans of `trace_id` once every one of `names` is in, by name."""
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                found = {s.name: s for s in self.spans if s.trace_id.hex() == trace_id}
            if set(found) >= set(names) or time.monotonic() > deadline:
                assert set(found) == set(names), sorted(found)
                return found
            time.sleep(0.05)


class ReceiverHandler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server's name)
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

        body = self.rfile.read(int(self.headers["Content-Length"]))
        request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
        with self.server.lock:
            for resource in request.resource_spans:
                for scope in resource.scope_spans:
                    self.server.spans.extend(scope.spans)
        reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
        self.send_response(200 if self.path == "/v1/traces" else 404)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def receiver():
    srv = Receiver()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.fixture(scope="module")
def exported(archives, receiver, tmp_path_factory):
    # Spans sent 0.2 s after they end, not the SDK's 5 s: the tests wait for them.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(tracing.SCHEDULE_DELAY_ENV, "200")
        srv = Server(ServerSettings(run_dir=tmp_path_factory.mktemp("exported"),
                                    model_store=Workspace.current().model_store,
                                    models=["lenet", "binary"], ports=Ports.free(),
                                    internal_ports=Ports.free(),
                                    otlp_endpoint=receiver.endpoint))
        with srv.running(timeout=180):
            yield srv


STAGES = ("queue", "preprocess", "inference", "postprocess")


@pytest.mark.parametrize("send", [rest, oip], ids=["rest", "oip"])
def test_one_requests_trace_reaches_an_otlp_receiver(exported, receiver, send):
    """caller -> proxy -> queue, preprocess, inference, postprocess, in that order in time."""
    caller_trace, caller_span = uuid.uuid4().hex, "00f067aa0ba902b7"  # a trace of its own
    r = send(exported, f"exported-{send.__name__}",
             headers={"traceparent": f"00-{caller_trace}-{caller_span}-01"})
    assert r.status_code == 200, r.text
    spans = receiver.trace(caller_trace, ("proxy", *STAGES))
    proxy = spans["proxy"]
    assert proxy.parent_span_id.hex() == caller_span
    assert proxy.span_id.hex() == timing(r)["traceparent"].split("-")[2]
    assert {name: spans[name].parent_span_id.hex() for name in STAGES} == {
        name: proxy.span_id.hex() for name in STAGES}
    assert len({spans[name].span_id for name in spans}) == 5
    starts = [spans[name].start_time_unix_nano for name in STAGES]
    assert starts == sorted(starts)
    attributes = {a.key: a.value.string_value for a in proxy.attributes}
    assert attributes["kiln.request_id"] == f"exported-{send.__name__}"


def test_an_unsampled_trace_is_not_exported(exported, receiver):
    """A caller's traceparent with its sampled flag off: no span of it, proxy's or worker's
    (those of a sampled request sent after it arrive, in order, first)."""
    unsampled, sampled = uuid.uuid4().hex, uuid.uuid4().hex
    for trace, flags in ((unsampled, "00"), (sampled, "01")):
        r = rest(exported, headers={"traceparent": f"00-{trace}-00f067aa0ba902b7-{flags}"})
        assert r.status_code == 200, r.text
        assert timing(r)["traceparent"].endswith(f"-{flags}")
    receiver.trace(sampled, ("proxy", *STAGES))
    with receiver.lock:
        assert [s.name for s in receiver.spans if s.trace_id.hex() == unsampled] == []
    # The proxy span came from the spans log, which has the sampled traces' lines only (the
    # unsampled request's would have been flushed with, or before, the sampled one's); with
    # no access log asked for, nginx writes no other.
    traces = [json.loads(line)["trace_id"]
              for line in front.spans_log_path(exported.run_dir).read_text().splitlines()]
    assert sampled in traces and unsampled not in traces
    assert not exported.access_log.exists()


def test_a_refused_key_flood_still_carries_the_request_id(traced):
    """Past the refused-key rate, nginx's 429 carries it too (last: the rate is per client
    address, and a 401 test after it would get 429)."""
    statuses = set()
    for i in range(300):
        r = rest(traced, f"flood-{i}", keyed=False)
        statuses.add(r.status_code)
        assert r.headers.get("X-Request-ID") == f"flood-{i}"
        if r.status_code == 429:
            break
    assert 429 in statuses
