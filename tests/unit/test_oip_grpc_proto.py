"""Kiln's OIP gRPC proto (deploy/oip_plugin/proto/grpc_predict_v2.proto) and the message
classes the plugin serves it with (TorchServe's, compiled from its open_inference_grpc.proto)
agree on the wire: the same messages, fields, numbers and types; only the package differs."""

import zipfile
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from grpc_tools import protoc

from kiln.deploy import plugins

OURS = plugins.OIP_PLUGIN_SOURCE / "proto" / "grpc_predict_v2.proto"
THEIRS = "open_inference_grpc.proto"


def model_server_jar() -> Path:
    import ts

    return Path(ts.__file__).parent / "frontend" / "model-server.jar"


def compiled(proto: Path, out: Path) -> descriptor_pb2.FileDescriptorProto:
    target = out / "set.pb"
    code = protoc.main(["protoc", f"-I{proto.parent}", f"--descriptor_set_out={target}",
                        str(proto)])
    assert code == 0, f"protoc failed on {proto}"
    (file,) = descriptor_pb2.FileDescriptorSet.FromString(target.read_bytes()).file
    return file


def wire(file: descriptor_pb2.FileDescriptorProto) -> dict:
    """{message path: [(field name, number, type, label, message type without package)]},
    and each method's (input, output) message."""
    def local(type_name: str) -> str:
        return type_name.removeprefix(f".{file.package}.")

    def fields(message, prefix=""):
        name = prefix + message.name
        out = {name: [(f.name, f.number, f.type, f.label, local(f.type_name))
                      for f in message.field]}
        for nested in message.nested_type:
            out.update(fields(nested, name + "."))
        return out

    messages = {}
    for message in file.message_type:
        messages.update(fields(message))
    (service,) = file.service
    methods = {m.name: (local(m.input_type), local(m.output_type)) for m in service.method}
    return {"service": service.name, "methods": methods, "messages": messages}


@pytest.fixture
def theirs(tmp_path):
    with zipfile.ZipFile(model_server_jar()) as jar:
        (tmp_path / THEIRS).write_bytes(jar.read(THEIRS))
    return compiled(tmp_path / THEIRS, tmp_path)


def test_kilns_proto_is_torchserves_on_the_wire(tmp_path, theirs):
    ours = compiled(OURS, tmp_path)
    assert ours.package == "inference"  # what clients call: inference.GRPCInferenceService
    assert wire(ours) == wire(theirs)
    assert set(wire(ours)["methods"]) == {"ServerLive", "ServerReady", "ModelReady",
                                          "ServerMetadata", "ModelMetadata", "ModelInfer"}


def test_the_proto_is_tritonclients_on_the_wire(tmp_path):
    """tritonclient's messages carry more (Triton's extensions); every field Kiln's has is
    theirs too, with the same number and type."""
    from tritonclient.grpc import service_pb2

    ours = wire(compiled(OURS, tmp_path))["messages"]
    triton = descriptor_pb2.FileDescriptorProto()
    service_pb2.DESCRIPTOR.CopyToProto(triton)
    for name, fields in ours.items():
        assert set(fields) <= set(wire(triton)["messages"][name]), name
