"""Server CPU per request, by process and by handler stage, under closed-loop wrk load.

    python -m kiln.loadtests.studies.handler_cost [--model lenet] [--seconds 20] [--profile OUT]

Serves one model behind Kiln's front proxy (2 workers, batch 16 / 5 ms by default), sends
the same body from `--clients` wrk connections, and prints the CPU microseconds per request
spent by the workers, by TorchServe's frontend and by nginx, and the handler's own stage
times per request (the sums and counts of Kiln's stage histograms over the run). With
`--profile` py-spy samples one worker meanwhile (`py-spy record --format raw`).
"""

from __future__ import annotations

import argparse
import logging
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import requests

from kiln.deploy.server import ModelServing, Ports, Server, ServerSettings
from kiln.handlers import metrics
from kiln.loadtests import wrk
from kiln.workspace import Workspace

log = logging.getLogger("kiln.loadtests")
# Read only: a committed test fixture of Kiln's checkout, the body this study has always sent.
BODY = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "digits" / "0.png"
WORKER_SCRIPT = "model_service_worker.py"


def cpu_seconds(procs: list[psutil.Process]) -> float:
    total = 0.0
    for proc in procs:
        try:
            t = proc.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


def processes(server: Server, nginx: bool = True) -> dict[str, list[psutil.Process]]:
    """The workers, TorchServe's frontend and (`nginx`) the front proxy's processes."""
    frontend = psutil.Process(server.pid())
    workers = [p for p in frontend.children(recursive=True)
               if any(a.endswith(WORKER_SCRIPT) for a in p.cmdline())]
    out = {"workers": workers, "frontend": [frontend]}
    if nginx:
        proxy = psutil.Process(server.front.pid())
        out["nginx"] = [proxy, *proxy.children()]
    return out


def stage_sums(text: str, model: str) -> dict[str, tuple[float, float]]:
    """{stage: (seconds summed, observations)} from a metrics page, over every worker."""
    out = {}
    for stage in metrics.STAGES:
        name = metrics.stage_metric(stage)
        found = {}
        for part in ("sum", "count"):
            pattern = rf'^{name}_{part}\{{[^}}]*model_name="{model}"[^}}]*\}} (\S+)$'
            found[part] = sum(float(v) for v in re.findall(pattern, text, re.M))
        out[stage] = (found["sum"], found["count"])
    return out


def scrape(server: Server) -> str:
    return requests.get(f"{server.url('metrics')}/metrics", timeout=10).text


def measure(server: Server, model: str, body: bytes, clients: int, seconds: int,
            profile: Path | None) -> dict:
    procs = processes(server)
    url = f"{server.url('inference')}/predictions/{model}"
    token = server.keys()["inference"]
    wrk.run(url, body, "image/png", token, clients, 2)  # warm up: every worker, every path
    before_stages, before_cpu = stage_sums(scrape(server), model), {
        k: cpu_seconds(v) for k, v in procs.items()}
    spy = None
    if profile is not None:
        spy = subprocess.Popen([str(Path(sys.executable).with_name("py-spy")), "record",
                                "--format", "raw", "--nonblocking", "-r", "200",
                                "-d", str(seconds), "-o", str(profile),
                                "-p", str(procs["workers"][0].pid)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = wrk.run(url, body, "image/png", token, clients, seconds)
    cpu = {k: cpu_seconds(v) - before_cpu[k] for k, v in procs.items()}
    if spy is not None:
        spy.wait(timeout=seconds + 30)
    after_stages = stage_sums(scrape(server), model)
    stages = {}
    for stage, (total, count) in after_stages.items():
        d_sum, d_count = total - before_stages[stage][0], count - before_stages[stage][1]
        stages[stage] = d_sum / d_count * 1e6 if d_count else float("nan")
    return {"requests": run.requests, "errors": run.errors, "rps": run.throughput_rps,
            "cpu_us": {k: v / run.requests * 1e6 for k, v in cpu.items()},
            "stage_us": stages}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="lenet", help="archive in model_store (default lenet)")
    p.add_argument("--body", type=Path, default=BODY, help=f"PNG body (default {BODY.name})")
    p.add_argument("--clients", type=int, default=32, help="wrk connections (default 32)")
    p.add_argument("--seconds", type=int, default=20, help="length of the run (default 20)")
    p.add_argument("--workers", type=int, default=2, help="default 2")
    p.add_argument("--batch-size", type=int, default=16, help="default 16")
    p.add_argument("--max-batch-delay-ms", type=int, default=5, help="default 5")
    p.add_argument("--profile", type=Path, help="py-spy raw output of one worker")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    serving = ModelServing(workers=args.workers, batch_size=args.batch_size,
                           max_batch_delay_ms=args.max_batch_delay_ms)
    with tempfile.TemporaryDirectory(prefix="kiln-cost-") as run_dir:
        server = Server(ServerSettings(Path(run_dir), Workspace.current().model_store, [args.model],
                                       Ports.free(), internal_ports=Ports.free(),
                                       serving={args.model: serving}))
        with server.running():
            result = measure(server, args.model, args.body.read_bytes(), args.clients,
                             args.seconds, args.profile)
    print(f"{result['requests']} requests, {result['errors']} errors, "
          f"{result['rps']:.0f} requests/s")
    print("server CPU per request (us): " + ", ".join(
        f"{k} {v:.0f}" for k, v in result["cpu_us"].items())
        + f", total {sum(result['cpu_us'].values()):.0f}")
    print("handler stage time per request (us): " + ", ".join(
        f"{k} {v:.0f}" for k, v in result["stage_us"].items()))
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
