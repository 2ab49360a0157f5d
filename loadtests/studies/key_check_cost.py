"""What the front proxy's key check costs a request (issue 18): the same Kiln front, rendered
for one running server, in three variants side by side in front of its TorchServe, each on
ports of its own: `lua` (Kiln's, deploy/nginx/kiln_keys.lua: a table lookup per request, no
reload on a key change), `map` (the check before issue 18: a generated regex map on
"$http_authorization $msec", which needs a reload per key change) and `none` (no check:
every request passes). The keys are two, as after a rotation (one ending, one not).

wrk at 16 keep-alive connections, in turn, `--rounds` times each: /kiln-oip (nginx answers it
itself once the key is checked: the check's share is largest there) and a lenet prediction
through TorchServe. Printed per variant (medians of the rounds): requests/s, and the CPU time
of nginx's one worker per request, which what else shares the cores disturbs far less; their
ratios, and the CPU microseconds a check adds.

    python -m kiln.loadtests.studies.key_check_cost [--seconds 3] [--rounds 6]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import re
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

from kiln.deploy import front
from kiln.deploy.server import Ports, Server, ServerSettings
from kiln.loadtests.bare_proxy import start_nginx, stop_nginx
from kiln.loadtests.studies.reliability.load import Mix
from kiln.loadtests.studies.reliability.served import rest_payload
from kiln.model_store.build import ensure_built
from kiln.workspace import Workspace

MODEL = "lenet"
CLIENTS = 16
PATHS = ("/kiln-oip", f"/predictions/{MODEL}")


def below(limit: int, width: int = 10) -> str:
    """The map's regex for the `width`-digit numbers below `limit` (as deploy/front.py made it
    before issue 18: nginx's $msec has ten digits of seconds)."""
    digits = f"{limit:0{width}d}"
    choices = [digits[:i] + (f"[0-{d - 1}]" if d > 1 else "0")
               + (rf"\d{{{width - i - 1}}}" if i < width - 1 else "")
               for i, d in enumerate(map(int, digits)) if d]
    return f"(?:{'|'.join(choices)})"


def map_check(keys: list[front.Key]) -> str:
    """The pre-issue-18 check: a map from "$http_authorization $msec" to $kiln_key_ok."""
    lines = []
    for key in keys:
        value = re.sub(r"([.+])", r"\\\1", key.value)
        seconds = r"\d+" if key.expires is None else below(int(key.expires))
        lines.append(f'        "~^[Bb]earer {value} {seconds}\\.\\d+$" 1;\n')
    return ('    map "$http_authorization $msec" $kiln_key_ok {\n        default 0;\n'
            + "".join(lines) + "    }\n")


def variant_conf(text: str, variant: str, keys: list[front.Key]) -> str:
    if variant == "lua":
        return text
    if variant == "none":
        return text.replace(front.KEY_SET, "set $kiln_key_ok 1;")
    return text.replace(front.KEY_SET, "").replace("http {\n", "http {\n" + map_check(keys), 1)


class Variant:
    """One more nginx in front of the server's TorchServe, with its own folder and ports."""

    def __init__(self, server: Server, variant: str, folder: Path, conf=None):
        """`conf(text)`: the variant's nginx.conf from the server's (by default
        variant_conf's for `variant`)."""
        self.name = variant
        ports = Ports.free()
        self.settings = dataclasses.replace(
            server.front_settings(server.torchserve_keys()["inference"]),
            nginx_dir=folder / variant,
            public={"http": ports.inference, "oip": ports.oip, "grpc": ports.grpc_inference,
                    "oip-grpc": ports.oip_grpc, "metrics": ports.metrics})
        keys = front.read_keys(server.front.keys_file)
        front.prepare(self.settings, keys)
        text = front.render(self.settings)
        self.settings.conf.write_text(conf(text) if conf else variant_conf(text, variant, keys))
        self.proc = start_nginx(self.settings.nginx_dir, self.settings.public["http"])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.settings.public['http']}"

    def worker_cpu_seconds(self) -> float:
        """CPU seconds so far of this nginx's one worker process."""
        (worker,) = psutil.Process(self.proc.pid).children()
        return sum(worker.cpu_times()[:2])

    def stop(self) -> None:
        stop_nginx(self.proc)


@contextlib.contextmanager
def variants_of(server: Server, names, folder: Path, conf=None) -> Iterator[list[Variant]]:
    """A Variant of each name in front of the server's TorchServe, stopped on the way out;
    `conf(name)`: the function that makes the name's nginx.conf (default: variant_conf)."""
    made = []
    try:
        for name in names:
            made.append(Variant(server, name, folder, conf(name) if conf else None))
        yield made
    finally:
        for v in made:
            v.stop()


def run(variant: Variant, path: str, token: str, seconds: float) -> tuple[float, float]:
    """wrk on `path` through `variant`: (requests/s, CPU microseconds of nginx's worker per
    request). The CPU time is what the check costs nginx, whatever else shares the cores."""
    payload = rest_payload(MODEL)
    before = variant.worker_cpu_seconds()
    load = Mix(variant.url, [(path, payload.body, payload.content_type)], token, CLIENTS,
               seconds).finish()
    cpu_s = variant.worker_cpu_seconds() - before
    if load.failed:
        raise RuntimeError(f"{variant.name} {path}: {load.failed} failed ({load.statuses})")
    return load.run.throughput_rps, 1e6 * cpu_s / load.run.requests


def measure(server: Server, variants: list[Variant], seconds: float, rounds: int) -> dict:
    token = server.keys()["inference"]
    runs = {(v.name, path): [] for v in variants for path in PATHS}
    for i in range(rounds):
        for path in PATHS:
            # Each round in another order: the cores are shared, and what else runs drifts.
            for v in variants[i % len(variants):] + variants[:i % len(variants)]:
                runs[v.name, path].append(run(v, path, token, seconds))
    table = {}
    for path in PATHS:
        rps = {v.name: statistics.median(r for r, _ in runs[v.name, path]) for v in variants}
        cpu = {v.name: statistics.median(c for _, c in runs[v.name, path]) for v in variants}
        table[path] = {
            "requests_per_s": {name: round(value) for name, value in rps.items()},
            "worker_cpu_us_per_request": {name: round(value, 1) for name, value in cpu.items()},
            "rps lua/map": round(rps["lua"] / rps["map"], 3),
            "rps lua/none": round(rps["lua"] / rps["none"], 3),
            "cpu lua/map": round(cpu["lua"] / cpu["map"], 3),
            "cpu lua-none us": round(cpu["lua"] - cpu["none"], 1),
            "cpu map-none us": round(cpu["map"] - cpu["none"], 1),
        }
    return table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=3, help="each run (default 3)")
    p.add_argument("--rounds", type=int, default=6, help="runs per variant and path (default 6)")
    opts = p.parse_args(argv)
    ensure_built(MODEL)
    with tempfile.TemporaryDirectory(prefix="kiln-keycost-") as folder:
        server = Server(ServerSettings(Path(folder) / "run", Workspace.current().model_store,
                                       [MODEL], Ports.free(), internal_ports=Ports.free()))
        with server.running(timeout=240):
            # As after a rotation: the first key ends in an hour, the new one does not.
            keys = front.rotate(server.front.keys(), time.time(), overlap_s=3600)
            server.front.apply(keys)
            with variants_of(server, ("none", "map", "lua"), Path(folder)) as variants:
                print(json.dumps(measure(server, variants, opts.seconds, opts.rounds),
                                 indent=1), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
