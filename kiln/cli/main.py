"""`kiln`: one thin command whose subcommands call into training/, model_store/ and deploy/."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from pathlib import Path

from kiln import client as http
from kiln import declaration
from kiln.cli.keys import cmd_keys
from kiln.cli.measure import cmd_bench, cmd_loadtest, cmd_tune
from kiln.cli.predict import cmd_batch, cmd_predict
from kiln.cli.replay import add_parser as add_replay_parser
from kiln.cli.serve import cmd_serve, cmd_stop, server_arguments
from kiln.cli.versions import add_parsers as add_version_parsers
from kiln.console import setup_logging
from kiln.deploy import front
from kiln.deploy.server import (
    BATCH_PER_MODEL,
    HOST,
    MAX_BATCH_DELAY_MS,
    MIN_BATCH,
    Ports,
)
from kiln.handlers import payload_log
from kiln.workspace import ENV, add_run_dir

# The build commands are the modules' own entry points (add_arguments and run). They need
# torch, so each module is imported only for its own command: `kiln predict` and `kiln stop`
# answer in a fraction of a second.
BUILD_STEPS = {
    "init": ("kiln.training.init", "declare a model you trained: model file + weights",
             "Write NAME.toml beside a model file from its weights and a few flags; a dry "
             "forward pass checks the declared inputs and output against the model."),
    "train": ("kiln.training.train", "train a model",
              "Train a model; writes artifacts/NAME/state_dict.pt, meta.json and a "
              "checkpoint (a --dry-run: artifacts/NAME/dry-run/), logs to TensorBoard."),
    "export": ("kiln.training.export", "export to TorchScript and ONNX with the parity gate",
               "Export to TorchScript and ONNX; fails unless both match eager PyTorch on the "
               "declaration's examples and the test split (or random inputs in the declared "
               "ranges)."),
    "archive": ("kiln.model_store.archive", "build model_store/NAME.mar",
                "Build model_store/NAME.mar with Kiln's handler, the signature and a "
                "model-config.yaml."),
}
BUILD_COMMANDS = (*BUILD_STEPS, "serve")


def _run_step(module: str):
    def run(args) -> int:
        return importlib.import_module(module).run(args)

    return run


# -- the parser ---------------------------------------------------------------------------------
class _SubcommandParser(argparse.ArgumentParser):
    """A subcommand's parser reports an unknown flag itself, with its own usage: argparse
    hands the leftovers to the top-level parser, whose usage names no subcommand's flags."""

    def parse_known_args(self, args=None, namespace=None):
        parsed, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed, extras


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole parser; the torch-heavy subcommands get their flags only when `command` is
    theirs (or None: all of them)."""
    def wanted(name: str) -> bool:
        return command is None or command == name

    parser = argparse.ArgumentParser(prog="kiln", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    # Read by main() before this parser is built (its defaults are the workspace's paths);
    # declared here for --help.
    parser.add_argument("--workspace", type=Path, metavar="DIR",
                        help=f"the folder everything a command writes goes under, here or "
                             f"after the subcommand (default: ${ENV}, else the current "
                             f"folder)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=_SubcommandParser)

    for step, (module, summary, description) in BUILD_STEPS.items():
        p = sub.add_parser(step, help=summary, description=description)
        if wanted(step):  # not `command`: that would rebind the one wanted() reads
            importlib.import_module(module).add_arguments(p)
        p.set_defaults(func=_run_step(module))

    p = sub.add_parser("serve", help="build what is missing and start TorchServe on 127.0.0.1",
                       description="Train, export and archive what is missing or stale, start "
                                   "TorchServe, wait until every model has a ready worker, "
                                   "and print how to call it.")
    p.add_argument("models", nargs="*", metavar="NAME",
                   help="declared models (or NAME.toml paths) to serve (default: Kiln's "
                        "default set: " + ", ".join(declaration.default_set()) + ")")
    declaration.add_models_dir(p)
    p.add_argument("--backend", choices=["onnx", "torchscript"],
                   help="exported form to serve; an archive holding the other is rebuilt "
                        "(default: the archive's, else onnx)")
    p.add_argument("--no-build", action="store_true",
                   help="serve the archives as they are, build nothing (default: build)")
    p.add_argument("--enable-model-api", action="store_true",
                   help="allow model registration through the management API (default: off)")
    p.add_argument("--admin-port", type=int, metavar="PORT",
                   help=f"serve the admin route (kiln deploy, route, ... --admin-url) on this "
                        f"port of {HOST}, for admin keys only (run/admin_keys) (default: off)")
    p.add_argument("--access-log", action="store_true",
                   help="write run/logs/kiln_access.jsonl (the front proxy's, JSON), one "
                        "line per request (default: off)")
    p.add_argument("--payload-log", type=float, default=0.0, metavar="FRACTION",
                   help="write the body and answer of this fraction of requests (0 to 1) "
                        "to run/payloads/, for kiln replay (default: 0, off)")
    p.add_argument("--payload-log-file-mb", type=float,
                   default=payload_log.DEFAULT_MAX_BYTES / 2**20, metavar="MB",
                   help=f"the payload log's files are rotated past this size (default: "
                        f"{payload_log.DEFAULT_MAX_BYTES // 2**20})")
    p.add_argument("--payload-log-files", type=int, default=payload_log.DEFAULT_FILES,
                   metavar="N", help=f"payload log files kept, the oldest dropped (default: "
                                     f"{payload_log.DEFAULT_FILES})")
    p.add_argument("--otlp-endpoint", metavar="URL",
                   default=os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None,
                   help="send the proxy's and the handler's spans there over OTLP/HTTP "
                        "(needs the tracing extra; default: $OTEL_EXPORTER_OTLP_ENDPOINT, "
                        "else none)")
    p.add_argument("--trace-sample", type=float, metavar="FRACTION",
                   default=float(os.environ.get("OTEL_TRACES_SAMPLER_ARG") or 1.0),
                   help="the share of requests without a caller's traceparent whose trace is "
                        "sampled (exported); a caller's keeps its own flag (default: "
                        "$OTEL_TRACES_SAMPLER_ARG, else 1)")
    p.add_argument("--timeout", type=float, default=180,
                   help="seconds to wait for every model to be ready (default: 180)")
    p.add_argument("--workers", type=int,
                   help="workers per served model (default: each declaration's [serving] "
                        "workers, else usable cores // served models, at least 1)")
    p.add_argument("--batch-size", type=int,
                   help=f"server-side batch size of every served model (default: each "
                        f"declaration's, else {BATCH_PER_MODEL} // workers, at least "
                        f"{MIN_BATCH})")
    p.add_argument("--max-batch-delay", type=int, metavar="MS",
                   help=f"ms to wait to fill a batch, for every served model (default: each "
                        f"declaration's, else {MAX_BATCH_DELAY_MS})")
    server_arguments(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("stop", help="stop the TorchServe that kiln serve started",
                       description="Stop the TorchServe that kiln serve started from "
                                   "--run-dir, or the one on the port a port flag names.")
    server_arguments(p, selects=True)
    p.set_defaults(func=cmd_stop)

    add_version_parsers(sub)

    p = sub.add_parser("keys", help="list, show, rotate or revoke the keys clients send",
                       description="List the front proxy's keys (the start of each, and when "
                                   "it ends), show the one to use (printed whole: KEY=$(kiln "
                                   "keys show)), rotate: add a new key and end the others "
                                   "after an overlap in which old and new both work, or revoke "
                                   "one at once. A running server takes a change at once, "
                                   "without a restart; a change it cannot take fails and "
                                   "changes nothing. --admin: the same for the admin keys.")
    p.add_argument("action", nargs="?", choices=["list", "show", "rotate", "revoke"],
                   default="list")
    p.add_argument("key", nargs="?", help="revoke: the key, or its start as list shows it "
                                          "(one that starts with '-': kiln keys [options] "
                                          "revoke -- KEY)")
    p.add_argument("--admin", action="store_true",
                   help="the admin keys (run/admin_keys: kiln serve --admin-port checks them, "
                        "read again at each change) instead of the inference keys")
    add_run_dir(p, "where kiln serve keeps its keys")
    p.add_argument("--overlap", type=float, default=front.DEFAULT_OVERLAP_S,
                   metavar="SECONDS",
                   help=f"how long the replaced keys keep working (default: "
                        f"{front.DEFAULT_OVERLAP_S})")
    p.add_argument("--lifetime", type=float, metavar="SECONDS",
                   help="the new key ends this long after now (default: never; it ends at a "
                        "later rotation)")
    p.set_defaults(func=cmd_keys)

    p = sub.add_parser("predict", help="send one file to a served model",
                       description="Send one file (.png, .jpg or .json) to a served model and "
                                   "print the answer; exit 1 on an HTTP error, 2 when --expect "
                                   "does not match.")
    p.add_argument("name", help="served model to ask")
    p.add_argument("file", type=Path, help="a PNG/JPEG image or a JSON file")
    p.add_argument("--url", help="inference base URL (default: from run/ports.json, or "
                                 f"http://{HOST}:{Ports.inference})")
    p.add_argument("--token", help=http.TOKEN_HELP)
    add_run_dir(p, "where kiln serve keeps its tokens and ports")
    p.add_argument("--expect", help="label the answer must have, else exit 2 (default: none)")
    p.add_argument("--json", action="store_true", help="print the raw JSON answer")
    p.add_argument("--timeout", type=float, default=30, help="seconds (default: 30)")
    p.add_argument("--grpc", action="store_true",
                   help="ask through TorchServe's gRPC inference API instead of HTTP; --url "
                        "is then unused (default: HTTP)")
    p.add_argument("--grpc-port", type=int,
                   help=f"gRPC inference port on {HOST} (default: from run/ports.json, or "
                        f"{Ports.grpc_inference})")
    p.set_defaults(func=cmd_predict)

    add_replay_parser(sub)

    p = sub.add_parser("batch", help="score a folder of images or a table of rows",
                       description="Score every input of a folder of images or a .npy, CSV, "
                                   "JSON Lines or Parquet file, locally, through TorchServe or "
                                   "on Ray, in resumable chunks; exit 1 if any input failed.")
    from kiln.batch.arguments import add_arguments as add_batch_arguments

    add_batch_arguments(p)
    declaration.add_models_dir(p)  # here: batch/ knows no declarations, only their exports
    p.set_defaults(func=cmd_batch)
    p = sub.add_parser("loadtest", help="load-test a served model with locust, write a report",
                       description="Run locust headless against a served model (or one it "
                                   "starts), sample metrics and CPU, write one HTML report; "
                                   "exit 1 when a threshold failed, 2 when it could not run.")
    from kiln.loadtests.arguments import add_arguments as add_loadtest_arguments

    add_loadtest_arguments(p)
    p.set_defaults(func=cmd_loadtest)
    from kiln.loadtests.bench_arguments import add_bench_arguments, add_tune_arguments

    p = sub.add_parser("bench", help="in-process, Kiln, stock TorchServe and no-op, side by side",
                       description="Measure one model in-process, served by Kiln, served by "
                                   "TorchServe's stock handler and by a no-op handler, with wrk; "
                                   "print ratios side by side.")
    add_bench_arguments(p)
    p.set_defaults(func=cmd_bench)
    p = sub.add_parser("tune", help="sweep batching, workers and backend under a p99 bound",
                       description="Sweep batch size, max batch delay, workers and backend; "
                                   "write the [serving] table of the fastest variant whose p99 "
                                   "stays under --p99-ms, into the declaration with "
                                   "--write-declaration (exit 1 when none does).")
    add_tune_arguments(p)
    p.set_defaults(func=cmd_tune)
    return parser


def _take_workspace(argv: list[str]) -> tuple[list[str], Path | None]:
    """(argv less --workspace DIR, wherever it was given; DIR resolved, or None)."""
    pick = argparse.ArgumentParser(prog="kiln", add_help=False, allow_abbrev=False)
    pick.add_argument("--workspace", type=Path)
    given, rest = pick.parse_known_args(argv)
    if given.workspace is not None and not given.workspace.is_dir():
        pick.error(f"--workspace {given.workspace}: no such folder")
    return rest, given.workspace and given.workspace.resolve()


@contextlib.contextmanager
def _in_workspace(folder: Path | None):
    """KILN_WORKSPACE=folder for this command and whatever it starts, and as it was after: a
    caller that runs main() in its own process (tests, scripts) keeps its workspace."""
    if folder is None:
        yield
        return
    before = os.environ.get(ENV)
    os.environ[ENV] = str(folder)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = before


def main(argv: list[str] | None = None) -> int:
    argv, folder = _take_workspace(sys.argv[1:] if argv is None else argv)
    with _in_workspace(folder):
        command = next((a for a in argv if not a.startswith("-")), "")
        args = build_parser(command if command in BUILD_COMMANDS else "").parse_args(argv)
        setup_logging(args.verbose)
        return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
