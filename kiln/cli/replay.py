"""`kiln replay LOG NAME[:VERSION]`: a payload log sent again to a model (batch/replay.py)."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from kiln import client as http
from kiln.batch import replay
from kiln.deploy.server import HOST, Ports
from kiln.handlers import payload_log
from kiln.workspace import add_run_dir

log = logging.getLogger("kiln")
# How often a long replay says how far it is.
PROGRESS_EVERY_S = 2.0


def add_parser(sub) -> None:
    p = sub.add_parser("replay", help="send a payload log to a served model, compare answers",
                       description="Send the requests of a payload log (kiln serve "
                                   "--payload-log) again to a served model, each on its "
                                   "protocol with its body, and report top-1 agreement "
                                   "(classifiers) or absolute differences (regression) with "
                                   "the logged answers, and latency; exit 1 when it could "
                                   "not run or no request was answered.")
    p.add_argument("log", type=Path, nargs="?", metavar="LOG",
                   help=f"a payload log file, or its folder (default: run/{payload_log.FOLDER}/ "
                        f"of --run-dir)")
    p.add_argument("model", metavar="NAME[:VERSION]",
                   help="served model (and version: default the served default) to ask; the "
                        "log's records of NAME are sent")
    add_run_dir(p, "where kiln serve keeps its ports and keys")
    p.add_argument("--token", help=http.TOKEN_HELP)
    p.add_argument("--timeout", type=float, default=30, help="seconds a request (default: 30)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.set_defaults(func=cmd_replay)


def target(run_dir: Path, token: str | None, timeout: float) -> replay.Target:
    ports = Ports.saved(run_dir) or Ports()
    return replay.Target(rest_url=f"http://{HOST}:{ports.inference}",
                         oip_url=f"http://{HOST}:{ports.oip}",
                         grpc_target=f"{HOST}:{ports.grpc_inference}",
                         token=token or http.read_token(run_dir), timeout=timeout)


def progress_printer():
    last = [time.monotonic()]

    def progress(done: int, total: int) -> None:
        if done == total or time.monotonic() - last[0] >= PROGRESS_EVERY_S:
            last[0] = time.monotonic()
            log.info("replayed %d of %d", done, total)

    return progress


def cmd_replay(args: argparse.Namespace) -> int:
    path = args.log or args.run_dir / payload_log.FOLDER
    try:
        name, version = replay.parse_model(args.model)
        records, left_out = replay.read_records(path, name)
    except (replay.ReplayError, OSError) as err:
        log.error("%s", err)
        return 1
    if not records:
        log.error("%s holds no request to %s (%s)", path, name,
                  ", ".join(f"{k} {v}" for k, v in left_out.items()) or "it is empty")
        return 1
    to = target(args.run_dir, args.token, args.timeout)
    try:
        report = replay.replay(records, to, name, version, progress_printer())
    except OSError as err:  # requests' connection errors are OSErrors; GrpcClient's too
        log.error("cannot reach the server (%s): is it running?", err)
        return 1
    finally:
        to.close()
    report.left_out = left_out
    if args.json:
        print(json.dumps(report.as_json(), indent=2))
    else:
        print(f"{name}{':' + version if version else ''} against {path}")
        print("\n".join(report.lines()))
    return 1 if report.nothing_answered() else 0
