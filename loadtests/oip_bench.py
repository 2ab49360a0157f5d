"""`kiln bench`'s Open Inference Protocol rows: OIP over HTTP with binary tensors (what
tritonclient's HTTP client sends by default) beside OIP over gRPC with raw_input_contents
(tritonclient.grpc's and perf_analyzer's), one Kiln server through its front proxy at the
comparison configuration, the model's first example, both loads from h2load: the same C
client for HTTP/1.1 and HTTP/2, one request in flight per connection."""

from __future__ import annotations

import json
import logging
import struct
import tempfile
from pathlib import Path

import grpc
import numpy as np
import requests

from kiln.declaration import Declaration
from kiln.deploy.plugins import OIP_PLUGIN_SOURCE
from kiln.deploy.server import HOST, ModelServing, Ports, Server
from kiln.loadtests import h2load, payloads, stock
from kiln.loadtests.batching import server_cpu_seconds
from kiln.loadtests.bench_table import FRONT, Row, config_name
from kiln.workspace import Workspace

log = logging.getLogger("kiln.bench")
PROTO = OIP_PLUGIN_SOURCE / "proto" / "grpc_predict_v2.proto"
INFER = "/inference.GRPCInferenceService/ModelInfer"
HTTP_ROW = "kiln oip http"
GRPC_ROW = "kiln oip grpc"
DTYPES = {"UINT8": np.uint8, "FP64": np.float64}


def messages():
    """(ModelInferRequest, ModelInferResponse) classes compiled from Kiln's proto."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory(prefix="kiln-proto-") as tmp:
        out = Path(tmp) / "set.pb"
        if protoc.main(["protoc", f"-I{PROTO.parent}", f"--descriptor_set_out={out}",
                        str(PROTO)]) != 0:
            raise RuntimeError(f"protoc failed on {PROTO}")
        files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    pool = descriptor_pool.DescriptorPool()
    pool.Add(files.file[0])
    return tuple(message_factory.GetMessageClass(pool.FindMessageTypeByName(f"inference.{m}"))
                 for m in ("ModelInferRequest", "ModelInferResponse"))


def tensor(decl: Declaration) -> dict | None:
    """The first example as one OIP tensor with its values as an array; None for a model
    whose input is not one image or one set of features (no OIP rows)."""
    spec = payloads.oip_input(decl)
    if spec is None:
        return None
    (one,) = payloads.oip_tensor(spec, payloads.raw_values(payloads.examples(decl)[0], spec))[
        "inputs"]
    one["values"] = np.asarray(one.pop("data"), dtype=DTYPES[one["datatype"]])
    return one


def http_body(t: dict) -> tuple[bytes, int]:
    """(body, JSON header length): the binary tensor extension, every output binary."""
    raw = t["values"].tobytes()
    header = json.dumps({"inputs": [{"name": t["name"], "shape": t["shape"],
                                     "datatype": t["datatype"],
                                     "parameters": {"binary_data_size": len(raw)}}],
                         "parameters": {"binary_data_output": True}}).encode()
    return header + raw, len(header)


def grpc_request(model: str, t: dict):
    request_type, _ = messages()
    request = request_type(model_name=model)
    request.inputs.add(name=t["name"], datatype=t["datatype"], shape=t["shape"])
    request.raw_input_contents.append(t["values"].tobytes())
    return request


def label(outputs: list, raw: list[bytes]) -> str:
    """The label output's first element from outputs (name dicts) and their raw bytes."""
    index = [o["name"] for o in outputs].index("label")
    (length,) = struct.unpack_from("<I", raw[index])
    return raw[index][4:4 + length].decode()


def check(server: Server, model: str, t: dict, expect: str | None) -> None:
    """One call on each protocol before timing; both must answer, with `expect`."""
    token = server.keys()["inference"]
    body, length = http_body(t)
    r = requests.post(f"{server.url('oip')}/v2/models/{model}/infer", data=body, timeout=30,
                      headers={"Authorization": f"Bearer {token}",
                               "Inference-Header-Content-Length": str(length)})
    r.raise_for_status()
    header_length = int(r.headers["Inference-Header-Content-Length"])
    answer = json.loads(r.content[:header_length])
    sizes = [o["parameters"]["binary_data_size"] for o in answer["outputs"]]
    offsets = np.cumsum([header_length, *sizes])
    raw = [r.content[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    _, response_type = messages()
    with grpc.insecure_channel(f"{HOST}:{server.ports.oip_grpc}") as channel:
        infer = channel.unary_unary(INFER, request_serializer=lambda m: m.SerializeToString(),
                                    response_deserializer=response_type.FromString)
        over_grpc = infer(grpc_request(model, t), metadata=(("authorization",
                                                             f"Bearer {token}"),))
    labels = {label(answer["outputs"], raw),
              label([{"name": o.name} for o in over_grpc.outputs], over_grpc.raw_output_contents)}
    if expect is not None and labels != {expect}:
        raise RuntimeError(f"OIP rows: labels {sorted(labels)}, expected {expect!r}")


def loads(server: Server, model: str, t: dict) -> dict[str, tuple[str, bytes, dict, bool]]:
    """Per row: (URL, body, headers, HTTP/1.1)."""
    token = server.keys()["inference"]
    body, length = http_body(t)
    message = grpc_request(model, t).SerializeToString()
    framed = struct.pack(">BI", 0, len(message)) + message  # gRPC's length-prefixed message
    return {
        HTTP_ROW: (f"{server.url('oip')}/v2/models/{model}/infer", body,
                   {"authorization": f"Bearer {token}", "content-type": "application/json",
                    "inference-header-content-length": str(length)}, True),
        GRPC_ROW: (f"http://{HOST}:{server.ports.oip_grpc}{INFER}", framed,
                   {"authorization": f"Bearer {token}", "content-type": "application/grpc",
                    "te": "trailers"}, False),
    }


def serving_cpu(server: Server) -> float:
    """CPU seconds of TorchServe's processes and nginx's (as bench.server_cpu's front rows)."""
    return server_cpu_seconds(server.pid()) + server_cpu_seconds(server.front.pid())


def rows(decl: Declaration, config: ModelServing, clients: list[int], seconds: int,
         root: Path, models_dirs: list[Path]) -> list[Row]:
    """Both rows at each of `clients`; none without h2load or for a model OIP rows skip."""
    t = tensor(decl)
    if t is None or not h2load.available():
        log.info("no OIP rows: %s", "h2load is not installed (apt-get install "
                 "nghttp2-client)" if t is not None else f"{decl.name} takes no single tensor")
        return []
    server = Server(stock.BenchSettings(
        root / "kiln-oip", Workspace.current().model_store, [decl.name], Ports.free(),
        models_dirs=models_dirs, internal_ports=Ports.free(), serving={decl.name: config}))
    out = []
    with server.running(timeout=240):
        check(server, decl.name, t, payloads.examples(decl)[0].expect)
        for name, (url, body, headers, http1) in loads(server, decl.name, t).items():
            h2load.run(url, body, headers, max(clients), 1, http1)  # warm-up
            for n in clients:
                log.info("%s: %d client(s) for %ds", name, n, seconds)
                cpu0 = serving_cpu(server)
                run = h2load.run(url, body, headers, n, seconds, http1)
                cpu = serving_cpu(server) - cpu0
                out.append(Row(name, n, run.throughput_rps, run.p50_ms, run.p99_ms,
                               run.requests, run.errors, run.client_cpu_pct,
                               cpu / run.seconds * 100, cpu * 1e6 / max(1, run.requests),
                               via=FRONT, config=config_name(config)))
    return out
