"""Batching off and on, side by side: `python -m kiln.loadtests.batching [--model NAME]`.

Starts one TorchServe on free loopback ports, registers the same archive several times with
different batch settings (through the management API, which overrides the archive's
model-config.yaml), drives each with the same closed-loop load at each concurrency, and
prints throughput, p50 and p99 with ratios to the unbatched configuration. The load
generator shares the machine's cores with the server: its CPU use is reported beside the
figures.
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import psutil
import requests

from kiln.console import setup_logging
from kiln.deploy.server import HOST, Ports, Server, ServerSettings
from kiln.loadtests import declared, payloads
from kiln.workspace import Workspace

log = logging.getLogger("kiln.bench")


@dataclass
class Result:
    config: str
    batch_size: int
    max_batch_delay_ms: int
    clients: int
    requests: int
    errors: int
    throughput_rps: float
    p50_ms: float
    p99_ms: float
    client_cpu_pct: float
    server_cpu_pct: float
    mean_batch: float


def closed_loop(port: int, path: str, body: bytes, headers: dict, clients: int,
                seconds: float) -> tuple[list[float], int, list[int]]:
    """`clients` threads, each sending the next request as soon as the last is answered."""
    latencies: list[float] = []
    batches: list[int] = []
    errors = [0]
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def worker():
        conn = http.client.HTTPConnection(HOST, port, timeout=30)
        mine, my_batches, my_errors = [], [], 0
        while time.perf_counter() < stop_at:
            start = time.perf_counter()
            conn.request("POST", path, body=body, headers=headers)
            resp = conn.getresponse()
            resp.read()
            mine.append(time.perf_counter() - start)
            if resp.status != 200:
                my_errors += 1
            my_batches.append(int(resp.getheader("Kiln-Batch-Size", "0")))
        conn.close()
        with lock:
            latencies.extend(mine)
            batches.extend(my_batches)
            errors[0] += my_errors

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, errors[0], batches


def server_cpu_seconds(pid: int) -> float:
    proc = psutil.Process(pid)
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def register(server: Server, model: str, name: str, batch_size: int, delay_ms: int,
             workers: int = 1, archive: str | None = None) -> None:
    """Register `archive` (default: MODEL.mar in the server's store) as `name`, overriding
    its model-config.yaml's batch settings and workers."""
    r = requests.post(
        f"{server.url('management')}/models",
        params={"url": archive or f"{model}.mar", "model_name": name,
                "batch_size": batch_size, "max_batch_delay": delay_ms,
                "initial_workers": workers, "synchronous": "true"},
        headers={"Authorization": f"Bearer {server.keys()['management']}"}, timeout=120)
    r.raise_for_status()


def measure(server: Server, name: str, batch_size: int, delay_ms: int, clients: int,
            seconds: float, body: bytes, content_type: str) -> Result:
    headers = {"Content-Type": content_type,
               "Authorization": f"Bearer {server.keys()['inference']}"}
    path = f"/predictions/{name}"
    closed_loop(server.ports.inference, path, body, headers, clients, 1.0)  # warm-up
    wall, cpu0, srv0 = time.perf_counter(), time.process_time(), server_cpu_seconds(server.pid())
    latencies, errors, batches = closed_loop(server.ports.inference, path, body, headers,
                                             clients, seconds)
    wall = time.perf_counter() - wall
    client_cpu = (time.process_time() - cpu0) / wall * 100
    srv_cpu = (server_cpu_seconds(server.pid()) - srv0) / wall * 100
    ms = np.asarray(latencies) * 1000
    return Result(name, batch_size, delay_ms, clients, len(ms), errors, len(ms) / wall,
                  float(np.percentile(ms, 50)), float(np.percentile(ms, 99)),
                  client_cpu, srv_cpu, float(np.mean(batches)))


def parse_configs(text: str) -> list[tuple[int, int]]:
    """"1:0,8:2" -> [(1, 0), (8, 2)]: batch size and max batch delay in ms."""
    return [tuple(int(v) for v in item.split(":")) for item in text.split(",")]


def print_table(results: list[Result], base_rows: list[Result] | None = None) -> None:
    """Each row with its ratios to the base row of the same concurrency (default: the
    unbatched configuration)."""
    base_rows = base_rows or [r for r in results if r.batch_size == 1]
    base = {r.clients: r for r in base_rows}
    print(f"{'config':<18}{'clients':>8}{'req/s':>9}{'x b1':>7}{'p50 ms':>9}{'p99 ms':>9}"
          f"{'x b1':>7}{'batch':>7}{'errors':>8}{'client CPU':>12}{'server CPU':>12}")
    for r in results:
        b = base.get(r.clients)
        tput = f"{r.throughput_rps / b.throughput_rps:.2f}" if b else "-"
        p99 = f"{r.p99_ms / b.p99_ms:.2f}" if b else "-"
        print(f"{r.config:<18}{r.clients:>8}{r.throughput_rps:>9.0f}{tput:>7}{r.p50_ms:>9.2f}"
              f"{r.p99_ms:>9.2f}{p99:>7}{r.mean_batch:>7.1f}{r.errors:>8}"
              f"{r.client_cpu_pct:>11.0f}%{r.server_cpu_pct:>11.0f}%")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    declared.add_model_argument(parser)
    parser.add_argument("--configs", default="1:0,4:2,8:2,8:5,16:5",
                        help="batch_size:max_batch_delay_ms list (default: 1:0,4:2,8:2,8:5,16:5)")
    parser.add_argument("--clients", default="1,16",
                        help="concurrencies to measure each config at (default: 1,16)")
    parser.add_argument("--seconds", type=float, default=8,
                        help="measured seconds per cell (default: 8)")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    setup_logging()
    decl = declared.chosen(parser, args)
    payload = payloads.first_payload(decl)
    configs = parse_configs(args.configs)
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as run_dir:
        server = Server(ServerSettings(Path(run_dir), Workspace.current().model_store, [],
                                       Ports.free(), enable_model_api=True))
        server.start()
        results = []
        try:
            server.wait_ready()
            for bs, delay in configs:
                name = f"{decl.name}_b{bs}_d{delay}"
                register(server, decl.name, name, bs, delay)
                for clients in (int(c) for c in args.clients.split(",")):
                    log.info("measuring %s with %d clients for %.0fs", name, clients,
                             args.seconds)
                    results.append(measure(server, name, bs, delay, clients, args.seconds,
                                           payload.body, payload.content_type))
        finally:
            server.stop()
    results.sort(key=lambda r: (r.clients, r.batch_size, r.max_batch_delay_ms))
    print_table(results)
    if args.out:
        args.out.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
