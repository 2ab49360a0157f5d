"""`kiln`: one thin command whose subcommands call into training/, model_store/ and deploy/."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import shutil
import sys
from pathlib import Path

from kiln import client as http
from kiln.console import setup_logging
from kiln.deploy import front
from kiln.deploy.server import (
    BATCH_PER_MODEL,
    HOST,
    INTERNAL_PORTS_FILE,
    MAX_BATCH_DELAY_MS,
    MIN_BATCH,
    ModelServing,
    Ports,
    Server,
    ServerError,
    ServerSettings,
    declared_serving,
    run_dirs_on,
)
from kiln.handlers.cores import usable_cores
from kiln.keys import KEYS_FILE, private_dir
from kiln.model_store import STORE
from kiln.training import declaration

log = logging.getLogger("kiln")
REPO_ROOT = Path(__file__).resolve().parents[2]
RUN_DIR = REPO_ROOT / "run"
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


# -- serve / stop / predict ------------------------------------------------------------------
def _server(args, models: list[str] | None = None,
            serving: dict[str, ModelServing] | None = None) -> Server:
    # Every port Ports defines has its flag (see _server_arguments): all pass through.
    ports = Ports(**_port_flags(args))
    saved = Ports.saved(args.run_dir)
    if models is None and saved:  # stop talks to what serve started
        ports = saved
    # TorchServe's own ports behind the front proxy: nobody else's business, so free ones
    # (two kiln serve on one host must not share them), kept while it runs.
    internal = Ports.saved(args.run_dir, INTERNAL_PORTS_FILE) or Ports.free()
    return Server(ServerSettings(run_dir=args.run_dir, model_store=args.store,
                                 models=models or declaration.default_set(), ports=ports,
                                 internal_ports=internal,
                                 enable_model_api=getattr(args, "enable_model_api", False),
                                 access_log=getattr(args, "access_log", False),
                                 models_dirs=getattr(args, "models_dirs", []),
                                 serving=serving or {}))


def _port_flags(args) -> dict[str, int]:
    """{api: port} of the port flags given (stop's are None unless given)."""
    flags = {api: getattr(args, f"{api}_port") for api in vars(Ports())}
    return {api: port for api, port in flags.items() if port is not None}


def _serving(args, models: list[str], cores: int | None = None) -> dict[str, ModelServing]:
    """Per model: the defaults derived for `cores` (None: the usable cores here) and these
    models < its declaration's [serving] < the flags given."""
    cores = usable_cores() if cores is None else cores
    defaults = ModelServing.derived(cores, len(models))
    flags = dict(workers=args.workers, batch_size=args.batch_size,
                 max_batch_delay_ms=args.max_batch_delay)
    serving = {m: declared_serving(m, args.models_dirs, defaults, **flags) for m in models}
    log.info("%d usable core(s), %d model(s): by default %d worker(s) each, batch size %d, "
             "max batch delay %d ms", cores, len(models), defaults.workers,
             defaults.batch_size, defaults.max_batch_delay_ms)
    for m, s in serving.items():
        log.info("%s: %d worker(s), batch size %d, max batch delay %d ms", m, s.workers,
                 s.batch_size, s.max_batch_delay_ms)
    return serving


def how_to_call(server: Server) -> str:
    url = server.url("inference")
    lines = [
        f"TorchServe is serving {', '.join(server.settings.models)} on {HOST}",
        f"  inference   {url}/predictions/NAME   (key required)",
        f"  OIP / v2    {server.url('oip')}/v2/models/NAME       (key required)",
        f"  gRPC        {HOST}:{server.ports.grpc_inference}     (key required)",
        f"  metrics     {server.url('metrics')}/metrics          (Prometheus)",
        f"  probes      {url}/ready  {url}/live",
        f"  keys        {server.front.keys_file}   (kiln keys rotate: a new one, the old ones "
        f"end after an overlap)",
        f"  management  {server.url('management')}/models        (TorchServe's management "
        f"token, in {server.key_file})",
        "",
        "Try (a key is printed only when asked for):",
    ]
    # The run folder records the ports and keys, so it is the one flag the hints repeat:
    # with it, predict and stop find this server whatever ports it was given.
    default_run = server.run_dir == RUN_DIR.resolve()
    run_dir = "" if default_run else f" --run-dir {_shown(server.run_dir)}"
    lines.append(f"  KEY=$(kiln keys show{run_dir})")
    auth = '-H "Authorization: Bearer $KEY"'
    predict = []
    for name in server.settings.models:
        try:
            examples = declaration.get(name, server.settings.models_dirs).examples
        except declaration.DeclarationError:
            continue
        if not examples:
            continue
        example = examples[0]
        if example.file is not None:
            ctype = http.CONTENT_TYPES.get(example.file.suffix, "application/octet-stream")
            body = f"--data-binary @{_shown(example.file)}"
            expect = f" --expect {example.expect}" if example.expect is not None else ""
            predict.append(f"  kiln predict {name} {_shown(example.file)}{expect}{run_dir}")
        else:
            ctype, body = "application/json", f"-d '{json.dumps(example.value)}'"
        lines.append(f'  curl -s {auth} -H "Content-Type: {ctype}" '
                     f"{body} {url}/predictions/{name}")
    stop = "make stop   (or: kiln stop)" if default_run else f"kiln stop{run_dir}"
    lines += ["", *predict[:1], "", f"Stop it with: {stop}"]
    return "\n".join(lines)


def _shown(path: Path) -> str:
    """A path as the user would type it from here."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def cmd_serve(args) -> int:
    try:
        models = ([declaration.get(m, args.models_dirs).name for m in args.models]
                  or declaration.default_set())
        serving = _serving(args, models)
    except ValueError as err:  # a declaration not found, or a bad serving setting
        log.error("%s", err)
        return 1
    server = _server(args, models, serving)
    if server.pid() is not None:
        server = Server(ServerSettings(args.run_dir, args.store, models,
                                       Ports.saved(args.run_dir) or server.ports,
                                       models_dirs=args.models_dirs,
                                       internal_ports=server.settings.internal_ports))
        log.info("TorchServe is already running from %s", args.run_dir)
        if server.front.pid() is None:
            log.warning("its front proxy (nginx) is not running: starting it")
            try:
                server.start_front()
            except ServerError as err:
                log.error("%s", err)
                return 1
        print(how_to_call(server))
        return 0
    if not _ports_free(server):
        return 1
    if not args.no_build:
        # torch and the training code come in only for what must be trained or exported.
        from kiln.model_store.build import ensure_built

        for name in models:
            ensure_built(name, args.backend, args.store, args.models_dirs)
    try:
        server.start()
        server.wait_ready(args.timeout)
    except ServerError as err:
        log.error("%s", err)
        server.stop()
        return 1
    print(how_to_call(server))
    return 0


def _ports_free(server: Server) -> bool:
    """Every port the server would bind is free; else each busy one is named with what
    holds it, before anything is built."""
    from kiln.deploy import port_holders

    server.clean_up_after_crash()  # a dead server's front proxy of this run folder, if any
    busy = port_holders.busy(server.settings)
    for line in busy:
        log.error("%s", line)
    if busy:
        log.error("nothing was built or started: stop what holds the port, or serve on "
                  "another one (--inference-port and the other port flags)")
    return not busy


def cmd_stop(args) -> int:
    asked = _port_flags(args)
    if asked:  # the server on these ports, from whichever run folder it was started
        found = run_dirs_on(asked)
        named = ", ".join(f"{api.replace('_', ' ')} port {port}" for api, port in asked.items())
        if len(found) != 1:
            log.error("%s TorchServe of Kiln's runs here with %s%s", len(found) or "no", named,
                      f": {', '.join(map(str, found))}; name one with --run-dir alone"
                      if found else "")
            return 1
        args.run_dir = found[0]
    server = _server(args)
    if server.stop():
        log.info("TorchServe stopped (%s)", args.run_dir)
    else:
        log.info("no TorchServe running from %s", args.run_dir)
    return 0


def cmd_keys(args) -> int:
    """List, show or rotate the front proxy's keys; a running front takes a rotation at once.
    A key is printed whole only by `show`."""
    import time

    path = args.run_dir / KEYS_FILE
    run = front.Front(args.run_dir.resolve() / "nginx", path)
    now = time.time()
    try:
        keys = front.read_keys(path) if path.exists() else []
        if args.action == "rotate":
            keys = front.rotate(keys, now, args.overlap, args.lifetime)
            taken = _rotate(args.run_dir, run, keys)
    except (OSError, ValueError, front.FrontError) as err:
        log.error("%s", err)
        return 1
    newest = front.current(keys, now)
    if newest is None:
        log.error("no valid key in %s: kiln serve makes the first one", path)
        return 1
    if args.action == "show":
        print(newest.value)
        return 0
    for key in keys:
        state = ("in use" if key is newest else
                 "expired" if not key.valid_at(now) else
                 "ends in %.0f s" % (key.expires - now) if key.expires else "valid")
        if key.expires and key.valid_at(now) and key is newest:
            state += ", ends in %.0f s" % (key.expires - now)
        print(f"{key.value[:6]}...  {state}")
    if args.action == "rotate":
        print(f"rotated: the new key is last (kiln keys show prints it); the others end in "
              f"{args.overlap:g} s" + ("" if taken else " (no server runs: kiln serve reads it)"))
    return 0


def _rotate(run_dir: Path, run: front.Front, keys: list) -> bool:
    """The rotated keys to the front that runs (True), or to the file alone when no server
    runs from `run_dir` (False). Raises, writing nothing, when a server runs but no front
    proxy of it can take them: nginx would go on with the old keys."""
    if run.wait_master(timeout=5) is not None or run.processes():
        run.apply(keys)  # raises when only a master's orphaned workers are left
        return True
    if Server(ServerSettings(run_dir, Path(), [])).pid() is not None:
        raise front.FrontError(f"TorchServe runs from {run_dir} but its front proxy does not: "
                               f"kiln serve starts it, with the keys of {run.keys_file}")
    private_dir(run_dir)  # kiln serve's run folder, made as serve makes it
    front.write_keys(run.keys_file, keys)
    return False


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
        artifacts=args.artifacts or REPO_ROOT / "artifacts" / name, via=args.via,
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


def _lacks_test_bench(command: str, *, module: str = "", program: str = "") -> bool:
    """Whether `command` lacks a part of the test bench, which `make serve` does not install:
    said in one line before any server starts, not as whatever the missing part breaks later.
    The module is looked up without importing it (locust brings gevent's monkey-patching)."""
    if module and importlib.util.find_spec(module) is None:
        missing = f"the Python module {module}"
    elif program and shutil.which(program) is None:
        missing = f"the program {program}"
    else:
        return False
    log.error("kiln %s needs %s, which is not installed: run make install-test", command,
              missing)
    return True


def cmd_loadtest(args) -> int:
    from kiln.loadtests import run

    if _lacks_test_bench("loadtest", module="locust"):
        return run.CANNOT_RUN
    return run.run(args)


def cmd_bench(args) -> int:
    if _lacks_test_bench("bench", program="wrk"):
        return 1
    from kiln.loadtests import bench

    return bench.run(args)


def cmd_tune(args) -> int:
    if _lacks_test_bench("tune", program="wrk"):
        return 1
    from kiln.loadtests import tune

    return tune.run(args)


# -- the parser ---------------------------------------------------------------------------------
def _server_arguments(p: argparse.ArgumentParser, selects: bool = False) -> None:
    """--run-dir, --store and a flag per port: the ports to serve on, or (`selects`: stop)
    the ports that pick the server to stop, whatever its run folder."""
    d = Ports()
    p.add_argument("--run-dir", type=Path, default=RUN_DIR,
                   help="folder for config, logs, tokens and pid (default: run/)")
    p.add_argument("--store", type=Path, default=STORE,
                   help="model store with the .mar files (default: model_store/)")
    for field, default in vars(d).items():
        flag = "--" + field.replace("_", "-") + "-port"
        what = field.replace("_", " ")
        if selects:
            p.add_argument(flag, type=int,
                           help=f"stop the server whose {what} port on {HOST} this is, from "
                                f"whichever run folder (default: the one of --run-dir)")
        else:
            p.add_argument(flag, type=int, default=default,
                           help=f"{what} port on {HOST} (default: {default})")


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
    p.add_argument("--access-log", action="store_true",
                   help="write run/logs/access_log.log, one line per request (default: off)")
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
    _server_arguments(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("stop", help="stop the TorchServe that kiln serve started",
                       description="Stop the TorchServe that kiln serve started from "
                                   "--run-dir, or the one on the port a port flag names.")
    _server_arguments(p, selects=True)
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser("keys", help="list, show or rotate the keys clients send",
                       description="List the front proxy's keys (the start of each, and when "
                                   "it ends), show the one to use (printed whole: KEY=$(kiln "
                                   "keys show)), or rotate: add a new key and end the others "
                                   "after an overlap in which old and new both work. A running "
                                   "server takes a rotation at once, without a restart; a "
                                   "rotation it cannot take fails and changes nothing.")
    p.add_argument("action", nargs="?", choices=["list", "show", "rotate"], default="list")
    p.add_argument("--run-dir", type=Path, default=RUN_DIR,
                   help="where kiln serve keeps its keys (default: run/)")
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
    p.add_argument("--run-dir", type=Path, default=RUN_DIR,
                   help="where kiln serve keeps its tokens and ports (default: run/)")
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

    p = sub.add_parser("batch", help="score a folder of images or a table of rows",
                       description="Score every input of a folder of images or a .npy, CSV, "
                                   "JSON Lines or Parquet file, locally, through TorchServe or "
                                   "on Ray, in resumable chunks; exit 1 if any input failed.")
    from kiln.batch.arguments import add_arguments as add_batch_arguments

    add_batch_arguments(p, RUN_DIR)
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), "")
    args = build_parser(command if command in BUILD_COMMANDS else "").parse_args(argv)
    setup_logging(args.verbose)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
