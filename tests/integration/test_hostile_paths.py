"""Paths that need normalising, against every route that needs no key (issue 16).

nginx routes a request by its normalised path but forwarded the raw one, with TorchServe's
token added: /predictions/lenet/1.0/../../../ping matched the open /ping and was a lenet
prediction behind it. Now any path that needs normalising is refused before routing on every
port, and each open route forwards the one path it exists for.
"""

import http.client
import itertools
import json

import grpc
import pytest

from kiln.grpc_client import load_stubs

SEVEN = "tests/fixtures/digits/7.png"
ODD_PATH = "the path must be plain"
GRPC_SERVICE = "/org.pytorch.serve.grpc.inference.InferenceAPIsService"

# Spellings of a parent segment and of a separator that nginx decodes or merges before it
# routes, and that a server behind it may read differently.
UPS = ["..", "%2e%2e", "%2E%2E", ".%2e", "%2e."]
SEPARATORS = ["/", "%2F", "%2f", "\\", "%5C"]
# Where a keyed route would go, and the open route each port has.
KEYED = {"http": ["/predictions/lenet", "/predictions/lenet/1.0", "/v1/models/lenet:predict"],
         "oip": ["/v2/models/lenet/infer", "/v2/models/lenet/versions/1.0/infer",
                 "/v2/models/lenet"]}
OPEN = {"http": ["/ping", "/ready", "/live"], "oip": ["/v2/health/ready", "/v2/health/live"],
        "metrics": ["/metrics", "/kiln-metrics"]}


def climb(keyed: str, open_route: str, up: str, sep: str) -> str:
    """keyed, then enough parent segments to get back to /, then the open route: a path that
    normalises to `open_route`."""
    depth = keyed.count("/")
    return keyed + (sep + up) * depth + open_route


def hostile_paths(port: str) -> list[str]:
    keyed = KEYED.get(port, ["/predictions/lenet"])
    paths = [climb(k, o, up, sep)
             for k, o in itertools.product(keyed, OPEN[port])
             for up, sep in itertools.product(UPS, SEPARATORS)]
    # No parent segment, but still not the path as written.
    for o in OPEN[port]:
        paths += ["/." + o, "/" + o, o + "/.", o + "/%2e", "/%2F" + o[1:],
                  o.replace("/", "/./"), "/x/.." + o, "/x%2f.." + o, o + "\\"]
    return paths


def raw_post(port: int, path: str, body: bytes, headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "image/png",
                                                       **(headers or {})})
        reply = conn.getresponse()
        return reply.status, reply.read()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def seven():
    with open(SEVEN, "rb") as f:
        return f.read()


def port_of(server, port: str) -> int:
    return {"http": server.ports.inference, "oip": server.ports.oip,
            "metrics": server.ports.metrics}[port]


@pytest.mark.parametrize("port", ["http", "oip", "metrics"])
def test_paths_that_need_normalising_are_refused_before_routing(server, seven, port):
    """Without a key and with one: 400 naming the problem, never an answer of a model."""
    key = {"Authorization": f"Bearer {server.keys()['inference']}"}
    wrong = []
    for path, headers in itertools.product(hostile_paths(port), [{}, key]):
        status, body = raw_post(port_of(server, port), path, seven, headers)
        if status != 400 or ODD_PATH not in body.decode(errors="replace"):
            wrong.append((path, bool(headers), status, body[:120]))
    assert not wrong, wrong


def test_the_reported_bypass_is_refused(server, seven):
    """The probe of the issue, as curl --path-as-is sent it: a lenet prediction without a key."""
    for path in ["/predictions/lenet/1.0/../../../ping",
                 "/predictions/lenet/1.0/..%2F..%2F..%2Fping"]:
        status, body = raw_post(server.ports.inference, path, seven)
        assert status == 400, (path, status, body)
        assert json.loads(body)["error"].startswith(ODD_PATH)


@pytest.mark.parametrize("route", ["/ping", "/live", "/ready"])
def test_open_routes_answer_only_as_themselves(server, seven, route):
    """A query or a body sent to an open route changes nothing of what it forwards."""
    for path in (route, route + "?model_name=lenet", route + "?x=/../predictions/lenet"):
        conn = http.client.HTTPConnection("127.0.0.1", server.ports.inference, timeout=30)
        try:
            conn.request("GET", path)
            reply = conn.getresponse()
            body = json.loads(reply.read())
        finally:
            conn.close()
        assert reply.status == 200, (path, reply.status, body)
        assert "label" not in body and "probabilities" not in json.dumps(body)


def test_a_grpc_method_path_that_needs_normalising_is_refused(server, tmp_path):
    """gRPC names its method in :path; one that nginx would normalise is not forwarded."""
    pb2, _ = load_stubs(tmp_path)
    request = pb2.PredictionsRequest(model_name="lenet", input={"data": open(SEVEN, "rb").read()})
    key = (("authorization", f"Bearer {server.keys()['inference']}"),)
    with grpc.insecure_channel(f"127.0.0.1:{server.ports.grpc_inference}") as channel:
        for method in (f"{GRPC_SERVICE}/../InferenceAPIsService/Predictions",
                       f"{GRPC_SERVICE}/x/../Predictions", f"{GRPC_SERVICE}//Predictions"):
            call = channel.unary_unary(method, request_serializer=lambda r: r.SerializeToString(),
                                       response_deserializer=lambda b: b)
            with pytest.raises(grpc.RpcError) as caught:
                call(request, metadata=key, timeout=30)
            assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED, (method, caught.value)
        good = channel.unary_unary(f"{GRPC_SERVICE}/Predictions",
                                   request_serializer=lambda r: r.SerializeToString(),
                                   response_deserializer=pb2.PredictionResponse.FromString)
        assert json.loads(good(request, metadata=key, timeout=30).prediction)["label"] == "7"
