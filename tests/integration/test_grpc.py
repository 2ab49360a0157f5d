"""TorchServe's gRPC inference API gives the same answers as its HTTP one."""

import json
import os
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import grpc
import pytest

from kiln.client import Answer, encode_file
from kiln.deploy import front
from kiln.deploy.server import Ports, ServerSettings
from kiln.grpc_client import GrpcClient, load_stubs

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
SEVEN = FIXTURES / "digits" / "7.png"
# Kiln's front proxy checks keys before TorchServe sees the call.
KEY_REFUSED = {"code": 401, "type": "UNAUTHENTICATED", "message": "missing or unknown key"}


@pytest.fixture(scope="session")
def stub_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("grpc-stubs")


@pytest.fixture(scope="session")
def grpc_target(server):
    return f"127.0.0.1:{server.ports.grpc_inference}"


@pytest.fixture(scope="session")
def rpc(server, grpc_target, stub_cache):
    with GrpcClient(grpc_target, server.keys()["inference"], cache_root=stub_cache) as client:
        yield client


def test_digit_gets_the_same_answer_as_over_http(rpc, client):
    answer = rpc.predict("lenet", *encode_file(SEVEN))
    assert answer.status == 200, answer.body
    assert answer.body["label"] == "7"
    assert answer == client.predict_file("lenet", SEVEN)


def test_named_features(rpc):
    answer = rpc.predict("binary", *encode_file(FIXTURES / "breast_cancer" / "benign.json"))
    assert answer.status == 200, answer.body
    assert answer.body["label"] == "benign"
    assert set(answer.body) == {"label", "probability"}


def test_bad_input_gets_the_handlers_400(rpc, client):
    answer = rpc.predict("lenet", b"hello", "application/octet-stream")
    assert answer == Answer(400, {"error": "not a PNG or JPEG image and not JSON", "code": 400})
    assert answer == client.predict("lenet", b"hello", "application/octet-stream")


def test_the_worker_keeps_serving_after_a_bad_input(rpc):
    assert rpc.predict("lenet", b"hello", "application/octet-stream").status == 400
    assert rpc.predict("lenet", *encode_file(SEVEN)).body["label"] == "7"


def test_unknown_model_reads_like_http(rpc, client):
    expected = Answer(404, {"code": 404, "type": "ModelNotFoundException",
                            "message": "Model not found: nope"})
    assert rpc.predict("nope", *encode_file(SEVEN)) == expected
    assert client.predict_file("nope", SEVEN) == expected


@pytest.mark.parametrize("token", [None, "nope", "management"])
def test_a_missing_or_wrong_token_is_refused(server, grpc_target, stub_cache, token):
    token = server.keys()["management"] if token == "management" else token
    with GrpcClient(grpc_target, token, cache_root=stub_cache) as refused:
        assert refused.predict("lenet", *encode_file(SEVEN)) == Answer(401, KEY_REFUSED)


def test_nothing_listening_is_a_connection_error(stub_cache):
    closed = Ports.free().inference  # free a moment ago: nothing listens there
    with GrpcClient(f"127.0.0.1:{closed}", "token", cache_root=stub_cache) as gone:
        with pytest.raises(ConnectionError):
            gone.predict("lenet", *encode_file(SEVEN))


def kiln(*args, cache):
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    return subprocess.run([sys.executable, "-m", "kiln.cli", "predict", *args],
                          capture_output=True, text=True, timeout=60, env=env)


def test_kiln_predict_over_grpc(server, client, tmp_path):
    grpc = ["--grpc", "--grpc-port", str(server.ports.grpc_inference), f"--token={client.token}"]
    done = kiln("lenet", str(SEVEN), *grpc, "--expect", "7", cache=tmp_path)
    assert done.returncode == 0, done.stderr
    over_http = kiln("lenet", str(SEVEN), "--url", server.url("inference"),
                     f"--token={client.token}", cache=tmp_path)
    assert done.stdout == over_http.stdout
    assert done.stdout.startswith("lenet: 7  (p=")
    wrong = kiln("lenet", str(SEVEN), *grpc, "--expect", "1", cache=tmp_path)
    assert wrong.returncode == 2
    assert "expected '1', got '7'" in wrong.stderr
    bad = kiln("binary", str(SEVEN), *grpc, cache=tmp_path)
    assert bad.returncode == 1
    assert json.loads(bad.stdout) == {"error": "this model takes features, not an image",
                                      "code": 400}


# -- statuses through the front proxy, as a plain gRPC client reads them ------------------------
SERVICE = "/org.pytorch.serve.grpc.inference.InferenceAPIsService"


def too_large(server):
    return ("RESOURCE_EXHAUSTED", f"the message is over {server.settings.max_request_size} bytes "
            "or the metadata over 8 KiB")


@pytest.fixture()
def channel(grpc_target):
    with grpc.insecure_channel(grpc_target) as ch:
        yield ch


def call(server, channel, stub_cache, model, data=None, version="", metadata=()):
    """(status name, details) of one Predictions call: ("OK", None) when answered."""
    pb2, _ = load_stubs(stub_cache)
    predictions = channel.unary_unary(f"{SERVICE}/Predictions",
                                      request_serializer=pb2.PredictionsRequest.SerializeToString,
                                      response_deserializer=pb2.PredictionResponse.FromString)
    request = pb2.PredictionsRequest(model_name=model, model_version=version,
                                     input={"data": SEVEN.read_bytes() if data is None else data})
    key = (("authorization", f"Bearer {server.keys()['inference']}"),)
    try:
        predictions(request, metadata=key + tuple(metadata), timeout=30)
    except grpc.RpcError as err:
        return err.code().name, err.details()
    return "OK", None


@pytest.mark.parametrize("model, version, message", [
    ("nope", "", "Model not found: nope\norg.pytorch.serve.archive.model.ModelNotFoundException"),
    ("lenet", "9.9", "Model version: 9.9 does not exist for model: lenet\n"
                     "org.pytorch.serve.archive.model.ModelVersionNotFoundException"),
], ids=["model", "version"])
def test_an_unknown_model_or_version_is_not_found(server, channel, stub_cache, model, version,
                                                  message):
    assert call(server, channel, stub_cache, model, version=version) == ("NOT_FOUND", message)


def test_no_model_name_is_an_invalid_argument(server, channel, stub_cache):
    assert call(server, channel, stub_cache, "") == (
        "INVALID_ARGUMENT", "Parameter model_name is required.\nBadRequestException.()")


@pytest.mark.parametrize("over", [1, ServerSettings.max_request_size])
def test_a_message_over_max_request_size_is_resource_exhausted(server, channel, stub_cache, over):
    data = b"x" * (server.settings.max_request_size + over)
    assert call(server, channel, stub_cache, "lenet", data) == too_large(server)
    assert call(server, channel, stub_cache, "lenet") == ("OK", None)


class InFlight:
    """A StreamPredictions2 call held open (headers sent, no message yet) on `channel`: it
    ends OK once released if its connection lived, UNAVAILABLE if the connection went."""

    def __init__(self, server, channel, stub_cache):
        pb2, _ = load_stubs(stub_cache)
        self.release = threading.Event()
        stream = channel.stream_stream(f"{SERVICE}/StreamPredictions2",
                                       request_serializer=pb2.PredictionsRequest.SerializeToString,
                                       response_deserializer=pb2.PredictionResponse.FromString)
        key = (("authorization", f"Bearer {server.keys()['inference']}"),)
        self.responses = stream(self._requests(), metadata=key, timeout=30)

    def _requests(self):
        self.release.wait(timeout=30)
        yield from ()

    def end(self) -> str:
        self.release.set()
        try:
            list(self.responses)
        except grpc.RpcError as err:
            return err.code().name
        return "OK"


@pytest.mark.parametrize("metadata", [
    [("x-big", "a" * 9000)],
    [("x-big", "a" * 16000)],  # nginx decodes a field of up to 16 KiB
    [(f"x-big-{i}", "a" * 10000) for i in range(3)],  # past TorchServe's GOAWAY limit
], ids=["9000", "16000", "3x10000"])
def test_metadata_over_8_kib_ends_its_call_not_the_connection(server, channel, stub_cache,
                                                              metadata):
    grpc.channel_ready_future(channel).result(timeout=10)
    neighbour = InFlight(server, channel, stub_cache)
    try:
        refused = call(server, channel, stub_cache, "lenet", metadata=metadata)
    finally:
        neighbour_ended = neighbour.end()
    assert refused == too_large(server)
    assert neighbour_ended == "OK"
    assert call(server, channel, stub_cache, "lenet", metadata=[("x-small", "a" * 7000)]) == (
        "OK", None)



def test_unknown_keys_are_limited_per_client_and_known_keys_are_not(server, channel,
                                                                     stub_cache):
    """As on the REST and OIP ports (and counted with them): a flood of calls with an unknown
    key gets UNAUTHENTICATED up to the burst, then RESOURCE_EXHAUSTED; a known key is served."""
    pb2, _ = load_stubs(stub_cache)
    predictions = channel.unary_unary(f"{SERVICE}/Predictions",
                                      request_serializer=pb2.PredictionsRequest.SerializeToString,
                                      response_deserializer=pb2.PredictionResponse.FromString)
    request = pb2.PredictionsRequest(model_name="lenet", input={"data": SEVEN.read_bytes()})
    codes, known = Counter(), []
    for i in range(400):
        try:
            predictions(request, metadata=(("authorization", "Bearer nope"),), timeout=30)
            codes["OK"] += 1
        except grpc.RpcError as err:
            codes[err.code().name] += 1
            if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                details = err.details()
        if i % 50 == 0:
            known.append(call(server, channel, stub_cache, "lenet"))
    assert set(codes) == {"UNAUTHENTICATED", "RESOURCE_EXHAUSTED"}, codes
    assert codes["UNAUTHENTICATED"] > front.REFUSED_KEY_BURST, codes
    assert details == front.TOO_MANY_REFUSED
    assert known == [("OK", None)] * 8
    # The allowance comes back before the next test.
    while True:
        try:
            predictions(request, metadata=(("authorization", "Bearer nope"),), timeout=30)
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.UNAUTHENTICATED:
                break
