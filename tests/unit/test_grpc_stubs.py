"""The gRPC stubs come from the installed TorchServe jar, once; gRPC errors read like HTTP's."""

import subprocess
import sys

import pytest

from kiln import grpc_client
from kiln.client import Answer


def test_stubs_are_generated_from_the_jar_and_import(tmp_path):
    folder = grpc_client.ensure_stubs(tmp_path)
    assert folder == grpc_client.stub_dir(tmp_path)
    assert folder.parent == tmp_path
    assert sorted(p.name for p in (folder / grpc_client.PACKAGE).glob("*.py")) == [
        "__init__.py", "inference_pb2.py", "inference_pb2_grpc.py"]
    assert (folder / "google" / "rpc" / "status_pb2.py").exists()
    # A fresh interpreter: this one's sys.path and modules stay as they were.
    probe = ("import sys; sys.path.append(sys.argv[1]); "
             "from kiln_torchserve_grpc import inference_pb2 as pb, inference_pb2_grpc as g; "
             "print(pb.DESCRIPTOR.services_by_name['InferenceAPIsService'].full_name, "
             "sorted(pb.PredictionsRequest.DESCRIPTOR.fields_by_name), "
             "hasattr(g, 'InferenceAPIsServiceStub'))")
    done = subprocess.run([sys.executable, "-c", probe, str(folder)], capture_output=True,
                          text=True, check=True)
    assert done.stdout.split("\n")[0] == (
        "org.pytorch.serve.grpc.inference.InferenceAPIsService "
        "['input', 'model_name', 'model_version', 'sequence_id'] True")


def test_stubs_are_generated_once(tmp_path, monkeypatch):
    folder = grpc_client.ensure_stubs(tmp_path)
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}

    def no_second_run(*args):
        raise AssertionError("protoc ran again")

    monkeypatch.setattr(grpc_client, "_run_protoc", no_second_run)
    assert grpc_client.ensure_stubs(tmp_path) == folder
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == before
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no partial folder left


def test_an_unfinished_cache_is_generated_again(tmp_path):
    folder = grpc_client.stub_dir(tmp_path)
    (folder / grpc_client.PACKAGE).mkdir(parents=True)  # a run killed before its rename
    assert grpc_client.ensure_stubs(tmp_path) == folder
    assert (folder / grpc_client.MARKER).exists()
    assert (folder / grpc_client.PACKAGE / "inference_pb2.py").exists()


def test_the_cache_is_keyed_by_torchserve_and_protobuf_versions(tmp_path):
    from importlib import metadata

    assert grpc_client.stub_dir(tmp_path).name == (
        f"torchserve-{metadata.version('torchserve')}-protobuf-{metadata.version('protobuf')}")


# -- answers ------------------------------------------------------------------------------------
def test_a_handler_error_body_carries_its_status():
    raw = b'{"error": "not a PNG or JPEG image and not JSON", "code": 400}'
    assert grpc_client.answer_from_reply(raw) == Answer(
        400, {"error": "not a PNG or JPEG image and not JSON", "code": 400})


@pytest.mark.parametrize("raw,body", [
    (b'{"label": "7", "probability": 0.5}', {"label": "7", "probability": 0.5}),
    (b'[{"label": "benign", "probability": 0.9}]', [{"label": "benign", "probability": 0.9}]),
    (b'{"error": "x", "code": 400, "label": "7"}', {"error": "x", "code": 400, "label": "7"}),
    (b"not json", "not json"),
])
def test_other_replies_are_answers(raw, body):
    assert grpc_client.answer_from_reply(raw) == Answer(200, body)


def test_frontend_errors_name_their_exception():
    details = "Model not found: nope\norg.pytorch.serve.archive.model.ModelNotFoundException"
    assert grpc_client.answer_from_error("INTERNAL", details) == Answer(
        404, {"code": 404, "type": "ModelNotFoundException", "message": "Model not found: nope"})


@pytest.mark.parametrize("code,status", [
    ("PERMISSION_DENIED", 403), ("INVALID_ARGUMENT", 400), ("INTERNAL", 500),
    ("UNKNOWN", 500), ("DEADLINE_EXCEEDED", 504),
])
def test_grpc_codes_become_http_statuses(code, status):
    assert grpc_client.answer_from_error(code, "went wrong") == Answer(
        status, {"code": status, "type": code, "message": "went wrong"})
