"""`kiln loadtest`: locust, headless, in a subprocess, against a running TorchServe (or one
it starts); metrics and CPU sampled meanwhile; at the end the per-endpoint table and the
thresholds' verdict on stdout, and one HTML report with them and its charts. The exit code is
locust's, which the locustfile's thresholds decide: 0 held, 1 failed, 2 could not run."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from kiln import client as http
from kiln.deploy.server import HOST, Ports, Server, ServerError, ServerSettings
from kiln.loadtests import declared, monitor, report, report_data, report_text, thresholds
from kiln.loadtests.locustfile_path import LOCUSTFILE, SHAPE_ENV, TOKEN_ENV

log = logging.getLogger("kiln.loadtest")
CANNOT_RUN = 2


@dataclass(frozen=True)
class Target:
    url: str
    oip_url: str
    metrics_url: str
    token: str | None
    server_pid: int | None


def target_from_args(args, server: Server | None = None) -> Target:
    """Flags first, then the server this run started, then run/ports.json and key_file.json."""
    if server is not None:
        ports, pid, token = server.ports, server.pid(), server.keys()["inference"]
    else:
        ports = Ports.saved(args.run_dir) or Ports()
        pid = Server(ServerSettings(args.run_dir, args.store, [])).pid()
        token = http.read_token(args.run_dir)
    url = args.url or f"http://{HOST}:{ports.inference}"
    if pid is None:
        pid = monitor.listening_pid(int(url.rsplit(":", 1)[1].split("/")[0]))
    return Target(url, args.oip_url or f"http://{HOST}:{ports.oip}",
                  args.metrics_url or f"http://{HOST}:{ports.metrics}",
                  args.token or token, pid)


def limits(args) -> thresholds.Thresholds:
    base = thresholds.load(args.thresholds) if args.thresholds else thresholds.Thresholds()
    return base.merged(max_fail_ratio=args.max_fail_ratio, max_p95_ms=args.max_p95_ms,
                       max_p99_ms=args.max_p99_ms)


def locust_command(args, target: Target, limit: thresholds.Thresholds, out: Path) -> list[str]:
    command = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
               "--host", target.url, "--users", str(args.users),
               "--spawn-rate", str(args.spawn_rate), "--run-time", f"{args.duration:g}s",
               "--csv", str(out / "locust"), "--csv-full-history", "--only-summary",
               "--logfile", str(out / "locust.log"), "--kiln-models", args.name,
               "--kiln-models-dirs", os.pathsep.join(str(d.resolve()) for d in args.models_dirs),
               "--kiln-oip-host", "" if args.no_oip else target.oip_url,
               "--kiln-verdict", str(out / "verdict.json")]
    for flag, value in (("--kiln-max-fail-ratio", limit.max_fail_ratio),
                        ("--kiln-max-p95-ms", limit.max_p95_ms),
                        ("--kiln-max-p99-ms", limit.max_p99_ms)):
        if value is not None:
            command += [flag, f"{value:g}"]
    return command


def locust_env(shape: str, token: str | None) -> dict[str, str]:
    """This environment plus what the locustfile reads. The locustfile imports Kiln as the
    installed `kiln` package; the repository root on PYTHONPATH would make its folders
    importable under generic names too (`handlers`, `training`), a second copy of each module."""
    return {**os.environ, SHAPE_ENV: shape, TOKEN_ENV: token or ""}


def drive(args, target: Target, out: Path) -> int:
    """Runs locust with the samplers around it, then writes report.html; locust's exit code."""
    out.mkdir(parents=True, exist_ok=True)
    command = locust_command(args, target, limits(args), out)
    env = locust_env(args.shape, target.token)
    scraper = monitor.MetricsScraper(args.scrape_interval, url=f"{target.metrics_url}/metrics")
    started = time.time()
    scraper.start()
    with open(out / "locust.out", "w") as stdout:
        locust = subprocess.Popen(command, env=env, cwd=out, stdout=stdout,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    cpu = monitor.CpuSampler(args.scrape_interval / 2,
                             roots={"server": target.server_pid, "client": locust.pid}).start()
    code = locust.wait()
    cpu.stop()
    time.sleep(0.5)  # a worker's last metric lines reach the frontend just after its answers
    scraper.stop()
    write_report(args, target, out, started, scraper.samples, cpu.samples)
    return code


def write_report(args, target, out, started, scrapes, cpu) -> None:
    verdict = out / "verdict.json"
    checks = ([thresholds.Check(**c) for c in json.loads(verdict.read_text())]
              if verdict.exists() else [])
    history, stats = out / "locust_stats_history.csv", out / "locust_stats.csv"
    run = report.Run(args.name, args.shape, args.users, args.spawn_rate, args.duration,
                     target.url, started, checks,
                     report_data.read_history(history, started) if history.exists() else {},
                     scrapes, cpu, psutil.cpu_count() or 1,
                     report_data.read_endpoints(stats) if stats.exists() else [])
    path = report.write(run, out / "report.html")
    print(report_text.render(run.endpoints, checks))
    print(f"report: {path}")


def default_out(args) -> Path:
    return args.run_dir / "loadtests" / f"{args.name}-{time.strftime('%Y%m%d-%H%M%S')}"


@contextlib.contextmanager
def own_server(args):
    with tempfile.TemporaryDirectory(prefix="kiln-loadtest-") as run_dir:
        server = Server(ServerSettings(Path(run_dir), args.store, [args.name], Ports.free(),
                                       models_dirs=args.models_dirs))
        with server.running():
            yield server


def resolve_name(args) -> None:
    """args.name as the declared name (it may be a NAME.toml path, whose folder then joins
    args.models_dirs); a name that is not declared fails here, before locust starts."""
    decl, args.models_dirs = declared.resolve(args.name, args.models_dirs)
    args.name = decl.name


def run(args) -> int:
    try:
        resolve_name(args)
        if args.start_server:
            with own_server(args) as server:
                return drive(args, target_from_args(args, server), args.out or default_out(args))
        return drive(args, target_from_args(args), args.out or default_out(args))
    except (ServerError, OSError, ValueError) as err:
        log.error("%s", err)
        return CANNOT_RUN
