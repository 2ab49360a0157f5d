"""The plain handler's best configuration, which `kiln bench` compares Kiln as served with
(issue 21; loadtests/bench.py's PLAIN_BEST_CONFIG):

    python -m kiln.loadtests.studies.plain_best [--configs w2b8d5,...] [--rounds 3]

loadtests/plain_handler.py on lenet's model.onnx at each configuration (workers, batch size,
max batch delay in ms), with Kiln's log4j2.xml and with TorchServe's own logging, straight to
TorchServe; one server per logging, every configuration a model of its own, all up and taking
turns (the order rotated every round) with wrk at 16 and 32 clients. Printed per cell: medians
of the rounds (inputs/s, p50, server CPU per request), the runs, and the load average.

With --released the servers run TorchServe as released (no greedy batching agent, no worker
site hook), as `kiln bench`'s plain best does: on the quiet machine, medians of 2 rounds over
five configurations, w2 b8 d5 with Kiln's logging did 4,706 inputs/s at 16 clients (w2 b8 d1:
4,820) and 6,040 at 32 (w2 b16 d5: 6,599, but 4,187 at 16); TorchServe's own logging was lower
in every configuration. Earlier, on Kiln's TorchServe at load average 9 to 14, w2 b8 d5 was
among the first two at 16 clients and the first four at 32. `kiln bench` uses w2 b8 d5 with
Kiln's logging.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
from pathlib import Path

import psutil

from kiln.console import setup_logging
from kiln.deploy.server import ModelServing, Ports, Server
from kiln.loadtests import declared, payloads, stock
from kiln.loadtests.bench import PLAIN_BEST_TORCHSERVE, Target, check_answer, served_row
from kiln.loadtests.bench_table import DIRECT, config_name
from kiln.model_store.build import ensure_built
from kiln.workspace import Workspace

MODEL = "lenet"
CONFIGS = "w1b8d1,w1b16d1,w1b16d5,w2b8d1,w2b8d5,w2b16d1,w2b16d5"
LOGGING = {"kiln": {}, "torchserve": {"log_config": None}}


def parse_config(text: str) -> ModelServing:
    """"w2b8d5" -> 2 workers, batch 8, 5 ms."""
    workers, rest = text.removeprefix("w").split("b")
    batch, delay = rest.split("d")
    return ModelServing(int(workers), int(batch), int(delay))


def servers(root: Path, configs: list[str], released: bool = False
            ) -> list[tuple[Server, Target]]:
    """Each configuration under each logging; `released`: TorchServe as released (no greedy
    batching agent, no worker site), as a user without Kiln runs it."""
    decl, _ = declared.resolve(MODEL, [])
    first = payloads.first_payload(decl)
    artifacts, store = Workspace.current().exports(MODEL), root / "store"
    store.mkdir()
    cells = []
    for logging_name, settings in LOGGING.items():
        models = {}
        for config in configs:
            name = f"plain_{logging_name}_{config}"
            stock.archive(name, decl.version, str(stock.PLAIN_HANDLER), artifacts / "model.onnx",
                          store, (artifacts / "signature.json",))
            models[name] = parse_config(config)
        server = Server(stock.BenchSettings(root / logging_name, store, list(models),
                                            Ports.free(), serving=models, **settings,
                                            **(PLAIN_BEST_TORCHSERVE if released else {})))
        cells += [(server, Target(name, DIRECT, config_name(c), name,
                                  (first.body, first.content_type), first.label))
                  for name, c in models.items()]
    return cells


def measure(cells: list[tuple[Server, Target]], rounds: int, seconds: int) -> dict:
    runs = {}
    for turn in range(rounds):
        for clients in (16, 32):
            for server, target in cells[turn % len(cells):] + cells[:turn % len(cells)]:
                row = served_row(target, server, clients, seconds)
                runs.setdefault((target.name, clients), []).append(row)
        print(f"round {turn + 1}: load average {psutil.getloadavg()[0]:.1f}", flush=True)
    return runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default=CONFIGS, help=f"wNbNdN list (default {CONFIGS})")
    p.add_argument("--rounds", type=int, default=3, help="turns of each cell (default 3)")
    p.add_argument("--seconds", type=int, default=4, help="each run (default 4)")
    p.add_argument("--released", action="store_true",
                   help="TorchServe as released, without Kiln's greedy batching and worker site")
    opts = p.parse_args(argv)
    setup_logging()
    ensure_built(MODEL)
    with tempfile.TemporaryDirectory(prefix="kiln-plainbest-") as root, \
            contextlib.ExitStack() as running:
        cells = servers(Path(root), opts.configs.split(","), opts.released)
        for server in dict.fromkeys(s for s, _ in cells):
            running.enter_context(server.running(timeout=300))
        for server, target in cells:
            check_answer(target, server)
            served_row(target, server, 32, 1)  # warm-up
        runs = measure(cells, opts.rounds, opts.seconds)
    for (name, clients), rows in sorted(runs.items(), key=lambda kv: kv[0][1]):
        def med(field, rows=rows):
            return statistics.median(getattr(r, field) for r in rows)
        print(f"{name:<28}{clients:>3} clients {med('throughput'):6.0f} inputs/s "
              f"{[round(r.throughput) for r in rows]} p50 {med('p50_ms'):5.2f} ms "
              f"server {med('server_cpu_us'):4.0f} us/request")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
