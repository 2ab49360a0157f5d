"""What Kiln's JSON access log costs the front proxy (issue 19, goal 5): one running server's
front, rendered twice side by side in front of its TorchServe, each nginx on ports of its own:
`off` without the log, `on` with it as Kiln ships it (deploy/nginx/nginx.conf, buffered).

wrk at 32 keep-alive connections sends lenet predictions to each in turn, the order reversed
every round, `--rounds` times. Printed per variant (medians of the rounds): requests/s and the
CPU microseconds of nginx's one worker per request (what else shares the cores disturbs it far
less than the throughput); then what the log adds to a request. Its four regular-expression
maps a line were suspected; a variant without them measured the same as the log with them.

    python -m kiln.loadtests.studies.access_log_cost [--seconds 4] [--rounds 8]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
from pathlib import Path

import psutil

from kiln.deploy.server import Ports, Server, ServerSettings
from kiln.loadtests import declared, payloads, wrk
from kiln.loadtests.studies.key_check_cost import Variant
from kiln.model_store.build import ensure_built
from kiln.workspace import Workspace

MODEL = "lenet"
CLIENTS = 32
VARIANTS = ("off", "on")
ACCESS_LOG = re.compile(r"\n\s*access_log [^\n]*kiln_json[^\n]*;")


def without_log(text: str) -> str:
    text, n = ACCESS_LOG.subn("\n", text)
    if n != 1:
        raise RuntimeError("nginx.conf no longer has the access log this study turns off")
    return text


def run(variant: Variant, token: str, payload: payloads.Payload, seconds: float
        ) -> tuple[float, float]:
    (worker,) = psutil.Process(variant.proc.pid).children()
    before = sum(worker.cpu_times()[:2])
    load = wrk.run(f"{variant.url}/predictions/{MODEL}", payload.body, payload.content_type,
                   token, CLIENTS, seconds)
    if load.errors:
        raise RuntimeError(f"{variant.name}: {load.errors} failed requests")
    return load.throughput_rps, 1e6 * (sum(worker.cpu_times()[:2]) - before) / load.requests


def measure(variants: list[Variant], token: str, seconds: float, rounds: int) -> dict:
    payload = payloads.first_payload(declared.resolve(MODEL, [])[0])
    for v in variants:  # warm-up
        run(v, token, payload, 1)
    runs = {v.name: [] for v in variants}
    for i in range(rounds):
        for v in variants[::-1] if i % 2 else variants:
            runs[v.name].append(run(v, token, payload, seconds))
    rps = {n: statistics.median(r for r, _ in found) for n, found in runs.items()}
    cpu = {n: statistics.median(c for _, c in found) for n, found in runs.items()}
    return {"requests_per_s": {n: round(v) for n, v in rps.items()},
            "nginx_cpu_us_per_request": {n: round(v, 1) for n, v in cpu.items()},
            "log, us a request": round(cpu["on"] - cpu["off"], 1),
            "rps on/off": round(rps["on"] / rps["off"], 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=4, help="each run (default 4)")
    p.add_argument("--rounds", type=int, default=8, help="runs per variant (default 8)")
    opts = p.parse_args(argv)
    ensure_built(MODEL)
    with tempfile.TemporaryDirectory(prefix="kiln-logcost-") as folder:
        server = Server(ServerSettings(Path(folder) / "run", Workspace.current().model_store,
                                       [MODEL], Ports.free(), internal_ports=Ports.free(),
                                       access_log=True))
        with server.running(timeout=240):
            variants = []
            try:
                for name in VARIANTS:
                    variants.append(Variant(server, name, Path(folder),
                                            without_log if name == "off" else lambda t: t))
                print(json.dumps(measure(variants, server.keys()["inference"], opts.seconds,
                                         opts.rounds), indent=1), flush=True)
            finally:
                for v in variants:
                    v.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
