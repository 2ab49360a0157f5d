"""The Open Inference Protocol over gRPC (KServe's inference.GRPCInferenceService), as
tritonclient's gRPC client speaks it, behind Kiln's front proxy: the same answers as OIP over
HTTP, byte for byte, the same errors in the same words, the same limits, and a gRPC status
per error class."""

import json
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import kserve_sdk
import numpy as np
import pytest
import requests
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from PIL import Image
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from kiln.deploy.server import Ports, Server, ServerSettings
from kiln.handlers import limits
from kiln.model_store.build import ensure_built
from kiln.workspace import Workspace

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
TWO_INPUTS = "digit_tokens"
MODELS = ["lenet", "binary", TWO_INPUTS]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    for name in MODELS:
        ensure_built(name)
    srv = Server(ServerSettings(run_dir=tmp_path_factory.mktemp("oip-grpc"),
                                model_store=Workspace.current().model_store, models=MODELS,
                                ports=Ports.free(), internal_ports=Ports.free(),
                                cores=len(MODELS)))
    with srv.running(timeout=240):
        yield srv


@pytest.fixture(scope="module")
def key(server):
    return server.keys()["inference"]


@pytest.fixture(scope="module")
def rpc(server):
    client = triton_grpc.InferenceServerClient(f"127.0.0.1:{server.ports.oip_grpc}")
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="module")
def http(server):
    client = triton_http.InferenceServerClient(server.url("oip").split("://", 1)[1])
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.ports.oip_grpc}") as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def auth(key):
    return {"authorization": f"Bearer {key}"}


def digits():
    return np.stack([np.asarray(Image.open(FIXTURES / "digits" / f"{d}.png"))
                     for d in "0123456789"]).astype(np.float32)


def cancer_features():
    rows = json.loads((FIXTURES / "breast_cancer" / "rows.json").read_text())
    return np.array([row["features"] for row in rows], dtype=np.float64)


def tokens():
    example = json.loads((FIXTURES / "digit_tokens" / "3.json").read_text())
    return {name: np.array([values], dtype=np.int64) for name, values in example.items()}


# (model, {input name: tensor}) as each model's metadata declares its inputs.
TENSORS = {"lenet": lambda: {"input": digits()},
           "binary": lambda: {"input": cancer_features()},
           TWO_INPUTS: tokens}
DATATYPES = {np.dtype(np.float32): "FP32", np.dtype(np.float64): "FP64",
             np.dtype(np.int64): "INT64"}


def grpc_inputs(tensors):
    out = []
    for name, values in tensors.items():
        tensor = triton_grpc.InferInput(name, list(values.shape), DATATYPES[values.dtype])
        tensor.set_data_from_numpy(values)  # raw_input_contents
        out.append(tensor)
    return out


def http_inputs(tensors, binary):
    out = []
    for name, values in tensors.items():
        tensor = triton_http.InferInput(name, list(values.shape), DATATYPES[values.dtype])
        tensor.set_data_from_numpy(values, binary_data=binary)
        out.append(tensor)
    return out


def as_bytes(array):
    """An output's values as bytes: its own for numbers, each element's for BYTES."""
    if array.dtype == object:
        return (array.shape, [bytes(v) for v in array.ravel()])
    return (array.shape, array.dtype, array.tobytes())


def http_error(server, key, model, body):
    r = requests.post(f"{server.url('oip')}/v2/models/{model}/infer", json=body,
                      headers={"Authorization": f"Bearer {key}"}, timeout=30)
    return r.status_code, r.json()["error"]


def refusal(call):
    with pytest.raises(grpc.RpcError) as refused:
        call()
    return refused.value.code(), refused.value.details()


# --- health and metadata -------------------------------------------------------------------


def test_health_reads_as_over_http(rpc, http, key):
    assert rpc.is_server_live(headers=auth(key)) is True
    assert rpc.is_server_ready(headers=auth(key)) is True
    for model in MODELS:
        assert rpc.is_model_ready(model, headers=auth(key)) is True
        assert http.is_model_ready(model, headers=auth(key)) is True


def test_probes_need_no_key_and_the_rest_does(stub):
    assert stub.ServerLive(service_pb2.ServerLiveRequest()).live is True
    assert stub.ServerReady(service_pb2.ServerReadyRequest()).ready is True
    assert refusal(lambda: stub.ModelReady(service_pb2.ModelReadyRequest(name="lenet"))) == (
        grpc.StatusCode.UNAUTHENTICATED, "missing or unknown key")


def test_metadata_reads_as_over_http(rpc, http, key):
    server = rpc.get_server_metadata(headers=auth(key), as_json=True)
    assert server == http.get_server_metadata(headers=auth(key))
    for model in MODELS:
        over_grpc = rpc.get_model_metadata(model, headers=auth(key), as_json=True)
        over_http = http.get_model_metadata(model, headers=auth(key))
        # protobuf's JSON writes int64 as strings
        for tensor in over_grpc["inputs"] + over_grpc["outputs"]:
            tensor["shape"] = [int(d) for d in tensor["shape"]]
        assert over_grpc == over_http


# --- infer ---------------------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_raw_tensors_answer_byte_for_byte_as_over_http(rpc, http, key, model):
    tensors = TENSORS[model]()
    over_grpc = rpc.infer(model, grpc_inputs(tensors), request_id="r-1", headers=auth(key))
    for binary in (True, False):
        over_http = http.infer(model, http_inputs(tensors, binary), request_id="r-1",
                               headers=auth(key))
        grpc_answer = over_grpc.get_response(as_json=True)
        http_answer = over_http.get_response()
        assert [o["name"] for o in grpc_answer["outputs"]] == \
            [o["name"] for o in http_answer["outputs"]]
        for name in (o["name"] for o in http_answer["outputs"]):
            assert as_bytes(over_grpc.as_numpy(name)) == as_bytes(over_http.as_numpy(name))
        assert {k: grpc_answer[k] for k in ("model_name", "model_version", "id")} == \
            {k: http_answer[k] for k in ("model_name", "model_version", "id")}
    # Every output comes back in raw_output_contents, as Triton answers.
    assert len(over_grpc.get_response().raw_output_contents) == len(grpc_answer["outputs"])


def test_an_answer_names_the_version_that_gave_it(server, stub, key):
    request = service_pb2.ModelInferRequest(model_name="lenet")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 28, 28])
    request.raw_input_contents.append(digits()[7].tobytes())
    answer, call = stub.ModelInfer.with_call(request, metadata=tuple(auth(key).items()))
    (version,) = requests.get(f"{server.url('oip')}/v2/models/lenet", timeout=30,
                              headers={"Authorization": f"Bearer {key}"}).json()["versions"]
    assert answer.model_version == version
    assert dict(call.initial_metadata())["x-kiln-model-version"] == version


def test_typed_contents_answer_as_raw_ones(stub, rpc, key):
    pixels = digits()[:3]
    request = service_pb2.ModelInferRequest(model_name="lenet", id="typed")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=list(pixels.shape))
    tensor.contents.fp32_contents.extend(pixels.ravel().tolist())
    typed = stub.ModelInfer(request, metadata=tuple(auth(key).items()))
    raw = rpc.infer("lenet", grpc_inputs({"input": pixels}), request_id="typed",
                    headers=auth(key)).get_response()
    assert typed == raw
    assert typed.raw_output_contents[1] == b"".join(
        len(d).to_bytes(4, "little") + d for d in (b"0", b"1", b"2"))


def test_two_typed_int64_inputs(stub, key):
    request = service_pb2.ModelInferRequest(model_name=TWO_INPUTS)
    for name, values in tokens().items():
        tensor = request.inputs.add(name=name, datatype="INT64", shape=list(values.shape))
        tensor.contents.int64_contents.extend(values.ravel().tolist())
    request.outputs.add(name="label")
    answer = stub.ModelInfer(request, metadata=tuple(auth(key).items()))
    assert [o.name for o in answer.outputs] == ["label"]
    assert answer.raw_output_contents == [(1).to_bytes(4, "little") + b"3"]


def test_requests_in_one_batch_get_their_own_answers_and_errors(rpc, key):
    good = grpc_inputs({"input": digits()[7:8]})
    bad = grpc_inputs({"input": np.zeros((1, 27, 28), dtype=np.float32)})

    def infer(inputs):
        try:
            return rpc.infer("lenet", inputs, headers=auth(key)).as_numpy("label").tolist()
        except InferenceServerException as e:
            return e.status()

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(infer, [good, bad] * 16))
    assert answers == [[b"7"], "StatusCode.INVALID_ARGUMENT"] * 16


# --- errors: the same words as over HTTP, a status per class --------------------------------


def test_a_bad_tensor_gets_invalid_argument_with_the_handlers_words(server, stub, key):
    shape = [1, 27, 28]
    request = service_pb2.ModelInferRequest(model_name="lenet")
    request.inputs.add(name="input", datatype="FP32", shape=shape)
    request.raw_input_contents.append(bytes(4 * 27 * 28))
    status, message = http_error(server, key, "lenet", {"inputs": [
        {"name": "input", "datatype": "FP32", "shape": shape, "data": [0.0] * (27 * 28)}]})
    assert status == 400
    assert refusal(lambda: stub.ModelInfer(request, metadata=tuple(auth(key).items()))) == (
        grpc.StatusCode.INVALID_ARGUMENT, message)


@pytest.mark.parametrize(("name", "version"), [("nope", ""), ("lenet", "9.9")])
def test_an_unknown_model_or_version_is_not_found(server, stub, key, name, version):
    request = service_pb2.ModelInferRequest(model_name=name, model_version=version)
    request.inputs.add(name="input", datatype="FP32", shape=[1, 28, 28])
    request.raw_input_contents.append(bytes(4 * 28 * 28))
    path = name + (f"/versions/{version}" if version else "")
    status, message = http_error(server, key, path, {"inputs": []})
    assert status == 404
    assert refusal(lambda: stub.ModelInfer(request, metadata=tuple(auth(key).items()))) == (
        grpc.StatusCode.NOT_FOUND, message)
    assert refusal(lambda: stub.ModelMetadata(
        service_pb2.ModelMetadataRequest(name=name, version=version),
        metadata=tuple(auth(key).items()))) == (grpc.StatusCode.NOT_FOUND, message)


@pytest.mark.parametrize("token", [None, "nope"])
def test_no_key_or_a_wrong_one_is_unauthenticated(rpc, token):
    headers = {} if token is None else auth(token)
    with pytest.raises(InferenceServerException) as refused:
        rpc.infer("lenet", grpc_inputs({"input": digits()[:1]}), headers=headers)
    assert (refused.value.status(), refused.value.message()) == (
        "StatusCode.UNAUTHENTICATED", "missing or unknown key")


@pytest.mark.parametrize(("shape", "message"), [
    ([limits.MAX_INSTANCES + 1, 28, 28],
     f"{limits.MAX_INSTANCES + 1} instances in one request, more than {limits.MAX_INSTANCES}"),
    ([limits.MAX_INSTANCES, 2049], f"{limits.MAX_INSTANCES * 2049} input values in one request, "
     f"more than the limit of {limits.MAX_REQUEST_VALUES}: send fewer rows"),
])  # fmt: skip
def test_tensors_over_the_handlers_limits_are_resource_exhausted(stub, key, shape, message):
    request = service_pb2.ModelInferRequest(model_name="lenet")
    request.inputs.add(name="input", datatype="UINT8", shape=shape)
    request.raw_input_contents.append(bytes(int(np.prod(shape))))
    assert refusal(lambda: stub.ModelInfer(request, metadata=tuple(auth(key).items()))) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED, message)


def test_a_message_over_max_request_size_is_resource_exhausted(server, stub, key):
    size = server.settings.max_request_size
    request = service_pb2.ModelInferRequest(model_name="lenet")
    request.inputs.add(name="input", datatype="UINT8", shape=[size // 784 + 1, 28, 28])
    request.raw_input_contents.append(bytes((size // 784 + 1) * 784))
    code, _ = refusal(lambda: stub.ModelInfer(request, metadata=tuple(auth(key).items())))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    # The connection serves the next call.
    assert stub.ServerLive(service_pb2.ServerLiveRequest()).live is True


@pytest.mark.parametrize(("change", "message"), [
    (lambda r: r.raw_input_contents.append(b"x"),
     "the request has 1 inputs and 2 raw_input_contents: send one per input, or none"),
    (lambda r: r.inputs[0].contents.fp32_contents.append(1.0),
     "input 'input' has contents, and the request has raw_input_contents: send every input "
     "one way"),
])  # fmt: skip
def test_raw_contents_that_do_not_fit_the_inputs_are_invalid(stub, key, change, message):
    request = service_pb2.ModelInferRequest(model_name="lenet")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 28, 28])
    request.raw_input_contents.append(bytes(4 * 28 * 28))
    change(request)
    assert refusal(lambda: stub.ModelInfer(request, metadata=tuple(auth(key).items()))) == (
        grpc.StatusCode.INVALID_ARGUMENT, message)


@pytest.mark.parametrize(("datatype", "fill", "message"), [
    ("FP32", lambda c: c.int_contents.extend([1] * 784),
     "input 'input' is FP32: its values go in fp32_contents, not int_contents"),
    ("FP32", lambda c: c.fp32_contents.extend([1.0] * 3),
     "input 'input' of shape [1, 28, 28] takes 784 values, but its contents hold 3"),
    ("UINT8", lambda c: c.uint_contents.extend([256] * 784),
     "input 'input' holds 256, outside UINT8's range [0, 255]"),
    ("FP16", lambda c: None,
     "input 'input' has datatype 'FP16', which has no typed contents: send its bytes in "
     "raw_input_contents"),
])  # fmt: skip
def test_typed_contents_that_do_not_fit_their_tensor_are_invalid(stub, key, datatype, fill,
                                                                 message):
    request = service_pb2.ModelInferRequest(model_name="lenet")
    tensor = request.inputs.add(name="input", datatype=datatype, shape=[1, 28, 28])
    fill(tensor.contents)
    assert refusal(lambda: stub.ModelInfer(request, metadata=tuple(auth(key).items()))) == (
        grpc.StatusCode.INVALID_ARGUMENT, message)


def test_each_grpc_port_serves_its_own_service(server, key):
    with grpc.insecure_channel(f"127.0.0.1:{server.ports.grpc_inference}") as channel:
        other = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        code, _ = refusal(lambda: other.ModelReady(service_pb2.ModelReadyRequest(name="lenet"),
                                                   metadata=tuple(auth(key).items())))
    assert code == grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load is not installed (apt-get "
                    "install nghttp2-client)")
def test_one_connection_carries_more_calls_than_nginxs_default_1000(server, tmp_path):
    # h2load never reconnects: each call is on its one HTTP/2 connection, as on a gRPC channel
    # that nginx's GOAWAY after 1000 calls would end.
    empty = tmp_path / "empty"
    empty.write_bytes(b"\0\0\0\0\0")  # a gRPC frame holding an empty ServerLiveRequest
    done = subprocess.run(
        ["h2load", "-n1001", "-c1", "-m1", "-d", str(empty), "-H", "content-type: application/grpc",
         "-H", "te: trailers",
         f"http://127.0.0.1:{server.ports.oip_grpc}/inference.GRPCInferenceService/ServerLive"],
        capture_output=True, text=True, timeout=120)
    assert "1001 done, 1001 succeeded, 0 failed" in done.stdout, done.stdout


# --- KServe's own gRPC client (in an interpreter of its own: kserve_sdk.py says why) -------


def test_kserves_grpc_client_sees_the_server_live_and_each_model_ready(server, key):
    assert kserve_sdk.call(kserve_sdk.grpc_probe, f"127.0.0.1:{server.ports.oip_grpc}",
                           tuple(auth(key).items()), MODELS) == (True, True, [True] * len(MODELS))


@pytest.mark.parametrize("binary", [True, False], ids=["raw", "typed"])
@pytest.mark.parametrize("model", MODELS)
def test_kserves_grpc_client_infers_as_tritonclient_does(server, rpc, key, model, binary):
    tensors = TENSORS[model]()
    name, request_id, outputs = kserve_sdk.call(
        kserve_sdk.grpc_infer, f"127.0.0.1:{server.ports.oip_grpc}", tuple(auth(key).items()),
        model, tensors, binary, "k-1")
    expected = rpc.infer(model, grpc_inputs(tensors), request_id="k-1", headers=auth(key))
    names = [o["name"] for o in expected.get_response(as_json=True)["outputs"]]
    assert (name, request_id, [n for n, _ in outputs]) == (model, "k-1", names)
    for output, got in outputs:
        assert as_bytes(got) == as_bytes(expected.as_numpy(output))


def test_without_the_front_proxy_the_plugin_serves_its_port_with_torchserves_token(tmp_path):
    """A server without Kiln's front proxy: the plugin binds the oip_grpc port itself, and
    the inference token TorchServe demands is the key."""
    ensure_built("lenet")
    srv = Server(ServerSettings(run_dir=tmp_path, model_store=Workspace.current().model_store,
                                models=["lenet"], ports=Ports.free()))
    with srv.running(timeout=240):
        client = triton_grpc.InferenceServerClient(f"127.0.0.1:{srv.ports.oip_grpc}")
        try:
            token = srv.keys()["inference"]
            answer = client.infer("lenet", grpc_inputs({"input": digits()[7:8]}),
                                  headers=auth(token))
            assert answer.as_numpy("label").tolist() == [b"7"]
            with pytest.raises(InferenceServerException) as refused:
                client.infer("lenet", grpc_inputs({"input": digits()[7:8]}))
            assert refused.value.status() == "StatusCode.UNAUTHENTICATED"
        finally:
            client.close()
