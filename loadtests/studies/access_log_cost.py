"""What Kiln's JSON access log costs the front proxy (issue 19, goal 5): one running server's
front, rendered three times side by side in front of its TorchServe, each nginx on ports of its
own:

- `off`: no access log;
- `on`: the log as Kiln ships it (deploy/nginx/nginx.conf, buffered): a REST prediction's line
  takes its model from its location's match and its route from the path as it is;
- `regex`: the same line with its fields as first shipped: the model and the route cut from
  the client's path by regular expressions whatever the route, a 200's reason matched.

wrk at 32 keep-alive connections sends lenet predictions to each in turn, the order reversed
every round, `--rounds` times. Printed per variant (medians of the rounds): requests/s and the
CPU microseconds of nginx's one worker per request (what else shares the cores disturbs it far
less than the throughput); then what each log adds to a request.

    python -m kiln.loadtests.studies.access_log_cost [--seconds 4] [--rounds 8]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
from pathlib import Path

from kiln.deploy.server import Ports, Server, ServerSettings
from kiln.loadtests import declared, payloads, wrk
from kiln.loadtests.studies.key_check_cost import Variant, variants_of
from kiln.model_store.build import ensure_built
from kiln.workspace import Workspace

MODEL = "lenet"
CLIENTS = 32
VARIANTS = ("off", "on", "regex")
ACCESS_LOG = re.compile(r"\n\s*access_log [^\n]*kiln_json[^\n]*;")
# The fields' maps as first shipped, for `regex`, in place of the shipped ones.
REGEX_MAPS = """    map $request_uri $kiln_log_model {
        "~^/(?:predictions|v1/models|v2/models)/([^/?:]+)" $1;
        default "";
    }
    map $request_uri $kiln_log_route {
        "~^([^?]*)" $1;
    }
"""
SHIPPED_MAPS = re.compile(r"    map \$kiln_model \$kiln_log_model \{.*?"
                          r"map \$request_uri \$kiln_log_route_cut \{.*?\n    \}\n", re.S)
REASON_OF_200 = re.compile(r'\n\s*":200" "";')


def changed(pattern: re.Pattern, replacement: str, text: str) -> str:
    text, n = pattern.subn(replacement, text)
    if n != 1:
        raise RuntimeError(f"nginx.conf no longer has what this study changes: {pattern.pattern}")
    return text


def conf_of(variant: str):
    """The variant's nginx.conf from the server's."""
    def conf(text: str) -> str:
        if variant == "off":  # said, not left out: without a directive nginx logs its own way
            return changed(ACCESS_LOG, "\n    access_log off;", text)
        if variant == "regex":
            return changed(REASON_OF_200, "", changed(SHIPPED_MAPS, REGEX_MAPS, text))
        return text
    return conf


def run(variant: Variant, token: str, payload: payloads.Payload, seconds: float
        ) -> tuple[float, float]:
    before = variant.worker_cpu_seconds()
    load = wrk.run(f"{variant.url}/predictions/{MODEL}", payload.body, payload.content_type,
                   token, CLIENTS, seconds)
    if load.errors:
        raise RuntimeError(f"{variant.name}: {load.errors} failed requests")
    return load.throughput_rps, 1e6 * (variant.worker_cpu_seconds() - before) / load.requests


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
            "log as shipped, us a request": round(cpu["on"] - cpu["off"], 1),
            "log with the regex fields, us a request": round(cpu["regex"] - cpu["off"], 1),
            "rps on/off": round(rps["on"] / rps["off"], 3),
            "rps regex/off": round(rps["regex"] / rps["off"], 3)}


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
            with variants_of(server, VARIANTS, Path(folder), conf_of) as variants:
                print(json.dumps(measure(variants, server.keys()["inference"], opts.seconds,
                                         opts.rounds), indent=1), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
