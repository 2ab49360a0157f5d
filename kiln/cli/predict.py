"""`kiln predict` and `kiln batch`: ask a served model, or score a batch of inputs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from kiln import client as http
from kiln import declaration
from kiln.deploy.server import HOST, Ports
from kiln.workspace import Workspace

log = logging.getLogger("kiln")


def _saved_port(run_dir: Path, api: str) -> int:
    """The port kiln serve wrote into run/ports.json for `api`, else the default one."""
    return getattr(Ports.saved(run_dir) or Ports(), api)


def _predict_client(args, token: str | None):
    """(address, client) for --grpc or HTTP. grpc and the generated stubs are imported only
    for --grpc: plain `kiln predict` must stay fast."""
    if not args.grpc:
        url = args.url or f"http://{HOST}:{_saved_port(args.run_dir, 'inference')}"
        return url, http.Client(url, token, args.timeout)
    from kiln.grpc_client import GrpcClient

    target = f"{HOST}:{args.grpc_port or _saved_port(args.run_dir, 'grpc_inference')}"
    return target, GrpcClient(target, token, args.timeout)


def cmd_predict(args) -> int:
    token = args.token or http.read_token(args.run_dir)
    try:
        body, content_type = http.encode_file(args.file)
    except (OSError, ValueError) as err:
        log.error("%s", err)
        return 1
    try:
        address, client = _predict_client(args, token)
    except (ImportError, RuntimeError) as err:  # no grpcio-tools, or protoc failed
        log.error("cannot set up the gRPC client: %s", err)
        return 1
    try:
        answer = client.predict(args.name, body, content_type)
    except OSError as err:  # requests' connection errors are OSErrors; GrpcClient's too
        log.error("cannot reach %s (%s): is TorchServe running? make serve starts it",
                  address, err.__class__.__name__)
        return 1
    if args.json or not answer.ok:
        print(json.dumps(answer.body, indent=2))
    else:
        print(describe(args.name, answer.body))
    if not answer.ok:
        log.error("HTTP %d", answer.status)
        return 1
    if args.expect is not None and answer.body.get("label") != args.expect:
        log.error("expected %r, got %r", args.expect, answer.body.get("label"))
        return 2
    return 0


def describe(name: str, body) -> str:
    if not isinstance(body, dict) or "label" not in body:
        return f"{name}: {json.dumps(body)}"
    line = f"{name}: {body['label']}  (p={body['probability']:.4f})"
    if "top_k" in body:
        line += "   top-k: " + ", ".join(
            f"{t['label']} {t['probability']:.4f}" for t in body["top_k"])
    return line


def cmd_batch(args) -> int:
    from kiln.batch import job

    try:
        name = declaration.get(args.name, args.models_dirs).name
    except declaration.DeclarationError as err:
        log.error("%s", err)
        return 1
    settings = job.JobSettings(
        name=name, input=args.input, output=args.output,
        artifacts=args.artifacts or Workspace.current().exports(name), via=args.via,
        backend=args.backend, batch_size=args.batch_size, concurrency=args.concurrency,
        chunk_size=args.chunk_size,
        resume=args.resume, timeout=args.timeout, retries=args.retries,
        url=args.url or f"http://{HOST}:{_saved_port(args.run_dir, 'inference')}",
        token=args.token or http.read_token(args.run_dir),
        progress=not args.no_progress, chunk_delay_s=args.chunk_delay)
    try:
        summary = job.run(settings)
    except (job.BatchError, OSError) as err:
        log.error("%s", err)
        return 1
    print(summary.describe())
    return 0 if summary.failed == 0 or args.allow_failures else 1
