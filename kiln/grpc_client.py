"""A gRPC client for TorchServe's inference service with the same predict() -> Answer as
kiln.client.Client, so that callers can switch protocols without changing anything else.

TorchServe ships its .proto files inside its frontend jar. The Python stubs are generated
from those files at first use (grpc_tools.protoc) into a per-user cache keyed by the
TorchServe and protobuf versions: they always match the installed server and runtime, and
no generated code lives in the repository.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

from kiln.client import Answer

log = logging.getLogger("kiln.grpc")

# The generated modules live in a package of Kiln's own name, so that a top-level
# `inference_pb2` from some other project on sys.path can never shadow them.
PACKAGE = "kiln_torchserve_grpc"
# jar member -> path under protoc's include root. inference.proto imports
# google/rpc/status.proto, which neither grpcio-tools nor protobuf ship; the jar does.
PROTOS = {
    "inference.proto": f"{PACKAGE}/inference.proto",
    "google/rpc/status.proto": "google/rpc/status.proto",
}
# Written last, inside the folder that is then renamed into place: its presence means the
# whole set of stubs is there.
MARKER = "COMPLETE"
# TorchServe's handlers take the request body from the "data" (or "body") input; a model
# with several inputs may instead take one map entry per input name.
BODY_KEY = "data"
# Metadata of Kiln's gRPC server (deploy/oip_plugin's GrpcCall): the version that answered,
# the shadows that also scored the call, and the key that routes a caller to one version
# (the REST headers' names, as gRPC metadata keys: lower case).
VERSION_KEY = "x-kiln-model-version"
SHADOWED_KEY = "x-kiln-shadowed"
ROUTING_KEY = "x-kiln-routing-key"


class StubError(RuntimeError):
    pass


# -- stub generation ----------------------------------------------------------------------------
def default_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kiln" / "grpc"


def torchserve_jar() -> Path:
    """The installed frontend jar, found without importing the `ts` package."""
    spec = importlib.util.find_spec("ts")
    if spec is None or not spec.submodule_search_locations:
        raise StubError("torchserve is not installed: its jar holds the gRPC .proto files")
    jar = Path(next(iter(spec.submodule_search_locations))) / "frontend" / "model-server.jar"
    if not jar.exists():
        raise StubError(f"no TorchServe frontend jar at {jar}")
    return jar


def stub_dir(cache_root: Path | None = None) -> Path:
    """Where the stubs for this TorchServe and this protobuf runtime live (generated code
    refuses to run on an older protobuf than the one it was generated for)."""
    key = f"torchserve-{metadata.version('torchserve')}-protobuf-{metadata.version('protobuf')}"
    return (cache_root or default_cache_root()) / key


def _extract_protos(jar: Path, include: Path) -> list[str]:
    with zipfile.ZipFile(jar) as archive:
        for member, rel in PROTOS.items():
            target = include / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.read(member))
    return list(PROTOS.values())


def _run_protoc(include: Path, out: Path, files: list[str]) -> None:
    from grpc_tools import protoc

    # grpc_tools' own copy of the well-known types (google/protobuf/empty.proto) matches
    # the protobuf runtime that will import the generated code.
    well_known = Path(protoc.__file__).parent / "_proto"
    code = protoc.main(["grpc_tools.protoc", f"-I{include}", f"-I{well_known}",
                        f"--python_out={out}", f"--grpc_python_out={out}", *files])
    if code != 0:
        raise StubError(f"grpc_tools.protoc failed with exit code {code} on {files}")


def ensure_stubs(cache_root: Path | None = None) -> Path:
    """Generate the stubs unless the cache has them; returns the folder to put on sys.path."""
    target = stub_dir(cache_root)
    if (target / MARKER).exists():
        return target
    jar = torchserve_jar()
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("generating TorchServe gRPC stubs from %s into %s", jar, target)
    # Built beside the target and renamed into place, so that a concurrent first use
    # (another kiln predict, a parallel test) never imports half-written stubs.
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".partial-") as tmp:
        include, out = Path(tmp) / "proto", Path(tmp) / "out"
        out.mkdir()
        _run_protoc(include, out, _extract_protos(jar, include))
        (out / PACKAGE / "__init__.py").write_text("")
        (out / MARKER).write_text(f"generated from {jar}\n")
        try:
            out.rename(target)
        except OSError:
            if not (target / MARKER).exists():  # not a lost race: something is in the way
                shutil.rmtree(target, ignore_errors=True)
                out.rename(target)
    return target


@functools.cache
def load_stubs(cache_root: Path | None = None):
    """(inference_pb2, inference_pb2_grpc), generating them on first use. The generated code
    imports its siblings by absolute name, hence the folder on sys.path."""
    folder = str(ensure_stubs(cache_root))
    if folder not in sys.path:
        sys.path.append(folder)
    return (importlib.import_module(f"{PACKAGE}.inference_pb2"),
            importlib.import_module(f"{PACKAGE}.inference_pb2_grpc"))


# -- answers ------------------------------------------------------------------------------------
# The inverse of TorchServe's GRPCUtils.getGRPCStatusCode (HTTP status -> gRPC status), so
# that a gRPC answer reads like the HTTP one. It sends any other 4xx as FAILED_PRECONDITION.
HTTP_STATUS = {
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "ABORTED": 409,
    "OUT_OF_RANGE": 416,
    "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499,
    "UNIMPLEMENTED": 501,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}
# The frontend sends most of its own errors as INTERNAL, naming the Java exception; these
# are the ones whose HTTP status says more than 500.
EXCEPTION_STATUS = {
    "ModelNotFoundException": 404,
    "ModelVersionNotFoundException": 404,
    "ServiceUnavailableException": 503,
}
JAVA_PACKAGE = "org.pytorch.serve."


def parse_body(raw: bytes) -> dict | list | str:
    text = raw.decode(errors="replace")
    try:
        return json.loads(text)
    except ValueError:
        return text


def answer_from_reply(prediction: bytes, metadata=()) -> Answer:
    """TorchServe 0.12 answers every handler response with gRPC OK: GRPCJob.response drops
    the status a handler sets per request. A Kiln handler's error body carries its code
    (docs/signature.md), so that is where the HTTP-like status comes from."""
    body = parse_body(prediction)
    if (isinstance(body, dict) and set(body) == {"error", "code"}
            and isinstance(body["code"], int) and body["code"] >= 400):
        return marked(Answer(body["code"], body), metadata)
    return marked(Answer(200, body), metadata)


def marked(answer: Answer, metadata) -> Answer:
    """`answer` with the version and shadows the call's metadata names: its initial metadata,
    or, from a server that answered with trailers only (an error), its trailing metadata."""
    found = dict(metadata)
    answer.version, answer.shadowed = found.get(VERSION_KEY), found.get(SHADOWED_KEY)
    return answer


def split_details(details: str | None) -> tuple[str, str | None]:
    """(message, Java exception name or None): the frontend's own errors are a message, a
    newline and the exception's class, e.g. org.pytorch.serve...ModelNotFoundException."""
    message, _, last = (details or "").rpartition("\n")
    if message and last.startswith(JAVA_PACKAGE):
        return message, last.rsplit(".", 1)[-1]
    return details or "", None


def answer_from_error(code_name: str, details: str | None, metadata=()) -> Answer:
    """An error the frontend raised itself (bad token, unknown model, no worker), with a
    body shaped like TorchServe's HTTP error body."""
    message, exception = split_details(details)
    status = EXCEPTION_STATUS.get(exception, HTTP_STATUS.get(code_name, 500))
    return marked(Answer(status, {"code": status, "type": exception or code_name,
                                  "message": message}), metadata)


def answer_metadata(call) -> list[tuple[str, str]]:
    """A finished call's metadata, initial then trailing (either may be absent)."""
    return [*(call.initial_metadata() or ()), *(call.trailing_metadata() or ())]


def input_map(values: dict) -> dict[str, bytes]:
    """{input name: value} as gRPC's input map: bytes stay as they are (an encoded image),
    anything else becomes its JSON."""
    return {name: value if isinstance(value, bytes) else json.dumps(value).encode()
            for name, value in values.items()}


# -- the client ---------------------------------------------------------------------------------
class GrpcClient:
    """predict() over TorchServe's InferenceAPIsService.Predictions."""

    def __init__(self, target: str, token: str | None = None, timeout: float = 30,
                 cache_root: Path | None = None):
        import grpc

        self.target = target
        self.token = token
        self.timeout = timeout
        self._rpc_error = grpc.RpcError
        self._pb2, pb2_grpc = load_stubs(cache_root)
        self._channel = grpc.insecure_channel(target)
        self._stub = pb2_grpc.InferenceAPIsServiceStub(self._channel)

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        # TorchServe's GRPCInterceptor reads the "authorization" metadata and parses it
        # exactly like the HTTP header: "Bearer <token>".
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def predict(self, name: str, body: bytes, content_type: str, version: str = "",
                routing_key: str | None = None) -> Answer:
        """content_type is accepted for the Client interface only: TorchServe's gRPC API has
        no per-input content type, and Kiln's handler tells images from JSON by their bytes.
        version: pinned to that version (empty: the model's route picks); routing_key: the
        same key always lands on the same version of a route."""
        return self._predictions(name, {BODY_KEY: body}, version, routing_key)

    def predict_inputs(self, name: str, values: dict) -> Answer:
        """One instance of a model with several inputs: the input map keyed by input name,
        each value the JSON of that input (or an encoded image's bytes as they are)."""
        return self._predictions(name, input_map(values))

    def predict_map(self, name: str, inputs: dict[str, bytes], version: str | None = None
                    ) -> Answer:
        """An input map as it is (kiln replay's logged one), to `version` if named."""
        return self._predictions(name, inputs, version or "")

    def _predictions(self, name: str, inputs: dict[str, bytes], version: str = "",
                     routing_key: str | None = None) -> Answer:
        request = self._pb2.PredictionsRequest(model_name=name, model_version=version,
                                               input=inputs)
        metadata = self._metadata()
        if routing_key:
            metadata += ((ROUTING_KEY, routing_key),)
        try:
            reply, call = self._stub.Predictions.with_call(request, metadata=metadata,
                                                           timeout=self.timeout)
        except self._rpc_error as err:
            code, details = err.code().name, err.details()
            # UNAVAILABLE without a TorchServe exception in it is the transport's: nothing
            # listens there. Raised as an OSError, as requests does, for the CLI's message.
            if code == "UNAVAILABLE" and split_details(details)[1] is None:
                raise ConnectionError(f"{self.target}: {details}") from err
            return answer_from_error(code, details, answer_metadata(err))
        return answer_from_reply(reply.prediction, answer_metadata(call))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> GrpcClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
