"""`kiln serve` and `kiln stop`: TorchServe behind its front proxy, how to call it, stopping it."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from kiln import client as http
from kiln import declaration
from kiln.deploy import versions
from kiln.deploy.server import (
    HOST,
    INTERNAL_PORTS_FILE,
    ModelServing,
    Ports,
    Server,
    ServerError,
    ServerSettings,
    declared_serving,
    run_dirs_on,
)
from kiln.handlers.cores import usable_cores
from kiln.workspace import Workspace, add_run_dir

log = logging.getLogger("kiln")


def _server(args, models: list[str] | None = None,
            serving: dict[str, ModelServing] | None = None) -> Server:
    # Every port Ports defines has its flag (see server_arguments): all pass through.
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
                                 admin_port=getattr(args, "admin_port", None),
                                 access_log=getattr(args, "access_log", False),
                                 otlp_endpoint=getattr(args, "otlp_endpoint", None),
                                 trace_sample=getattr(args, "trace_sample", 1.0),
                                 models_dirs=getattr(args, "models_dirs", []),
                                 serving=serving or {}, **_payload_log(args)))


def _payload_log(args) -> dict:
    """ServerSettings' payload log fields from serve's flags (none for stop)."""
    if getattr(args, "payload_log", None) is None:
        return {}
    return dict(payload_log=args.payload_log,
                payload_log_max_bytes=max(1, int(args.payload_log_file_mb * 2**20)),
                payload_log_files=args.payload_log_files)


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
        f"  OIP gRPC    {HOST}:{server.ports.oip_grpc}     (key required; KServe v2 gRPC)",
        f"  metrics     {server.url('metrics')}/metrics          (Prometheus)",
        f"  probes      {url}/ready  {url}/live",
        f"  keys        {server.front.keys_file}   (kiln keys rotate: a new one, the old ones "
        f"end after an overlap)",
        f"  management  {server.url('management')}/models        (TorchServe's management "
        f"token, in {server.key_file})",
        "",
        "Try (a key is printed only when asked for):",
    ]
    if server.settings.admin_port is not None:
        lines.insert(-2, f"  admin       http://{HOST}:{server.settings.admin_port}/models   "
                         f"(admin key: kiln keys --admin show; kiln route ... --admin-url URL)")
    # The run folder records the ports and keys, so it is the one flag the hints repeat:
    # with it, predict and stop find this server whatever ports it was given.
    default_run = server.run_dir == Workspace.current().run
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
        # What kiln deploy recorded is registered again through the model API.
        deployed = versions.load(args.run_dir)
    except ValueError as err:  # a declaration not found, a bad serving setting or state file
        log.error("%s", err)
        return 1
    args.enable_model_api = args.enable_model_api or bool(deployed)
    try:
        server = _server(args, models, serving)
    except ValueError as err:  # a payload log setting out of range
        log.error("%s", err)
        return 1
    if server.pid() is not None:
        server = Server(ServerSettings(args.run_dir, args.store, models,
                                       Ports.saved(args.run_dir) or server.ports,
                                       models_dirs=args.models_dirs,
                                       internal_ports=server.settings.internal_ports,
                                       admin_port=args.admin_port))
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
            # A deployed version is immutable: its archive is served as it was built, even
            # when the weights it was built from have changed since.
            if name not in deployed:
                ensure_built(name, args.backend, args.store, args.models_dirs)
    try:
        server.start()
        server.wait_ready(args.timeout)
        _restore(args, [m for m in models if m in deployed])
    except (ServerError, ValueError, RuntimeError, OSError) as err:
        log.error("%s", err)
        server.stop()
        return 1
    print(how_to_call(server))
    return 0


def _restore(args, names: list[str]) -> None:
    """The versions, defaults and retirements run/versions.json records, brought back."""
    from kiln.deploy import lifecycle

    if not names:
        return
    target = lifecycle.Target.of(args.run_dir.resolve(), args.store.resolve())
    state = versions.load(args.run_dir)
    for name in names:
        for line in lifecycle.restore(target, name, state):
            log.info("%s", line)


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


def server_arguments(p: argparse.ArgumentParser, selects: bool = False) -> None:
    """--run-dir, --store and a flag per port: the ports to serve on, or (`selects`: stop)
    the ports that pick the server to stop, whatever its run folder."""
    d = Ports()
    add_run_dir(p, "folder for config, logs, tokens and pid")
    p.add_argument("--store", type=Path, default=Workspace.current().model_store,
                   help="model store with the .mar files (default: the workspace's "
                        "model_store/)")
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
