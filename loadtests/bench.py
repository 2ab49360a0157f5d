"""One model, side by side in one run: `kiln bench NAME`.

Rows: the model alone in this process (the ceiling), the model served through Kiln's
handler (its normal archive), the same TorchScript graph served by TorchServe's stock
handler with TorchServe's default settings (what a user gets without Kiln), and the same
TorchServe with a handler that answers a constant (the server's own ceiling). Each row gets
its throughput, p50 and p99 at one client and at --clients, and its ratios to the ceiling,
to the no-op server and to the stock handler.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from kiln.client import Client
from kiln.deploy.server import ModelServing, Ports, Server, ServerSettings, declared_serving
from kiln.loadtests import declared, inprocess, payloads, stock, wrk
from kiln.loadtests.batching import server_cpu_seconds
from kiln.model_store import STORE
from kiln.training import declaration

log = logging.getLogger("kiln.bench")
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
SERVED = ("kiln", "stock", "noop")


@dataclass
class Row:
    name: str
    clients: int  # 0: in-process, one caller
    throughput: float  # inputs per second
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int = 0
    client_cpu_pct: float | None = None
    server_cpu_pct: float | None = None
    x_ceiling: float | None = None
    x_noop: float | None = None
    x_stock: float | None = None
    p99_x_stock: float | None = None


def _ratio(a: float, b: Row | None, field: str = "throughput") -> float | None:
    base = getattr(b, field) if b else 0
    # Three significant figures: the in-process ceiling can be 1000x a served row.
    return float(f"{a / base:.3g}") if base else None


def add_ratios(rows: list[Row]) -> list[Row]:
    """Each row against the best in-process row, and against the no-op and stock servers at
    the same concurrency (in-process rows: at the highest one, where throughput peaks)."""
    inproc = [r for r in rows if r.clients == 0]
    ceiling = max(inproc, key=lambda r: r.throughput) if inproc else None
    peak = max((r.clients for r in rows), default=0)
    by = {(r.name, r.clients): r for r in rows if r.name in SERVED}
    for r in rows:
        clients = r.clients or peak
        noop, stock_row = by.get(("noop", clients)), by.get(("stock", clients))
        r.x_ceiling = _ratio(r.throughput, ceiling)
        r.x_noop = _ratio(r.throughput, noop)
        r.x_stock = _ratio(r.throughput, stock_row)
        r.p99_x_stock = _ratio(r.p99_ms, stock_row, "p99_ms")
    return rows


def _cell(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: list[Row]) -> str:
    head = (f"{'row':<24}{'clients':>8}{'inputs/s':>10}{'x ceil':>10}{'x noop':>8}"
            f"{'x stock':>8}{'p50 ms':>9}{'p99 ms':>9}{'p99 x st':>10}{'errors':>7}"
            f"{'wrk CPU':>9}{'srv CPU':>9}")
    lines = [head]
    for r in rows:
        lines.append(
            f"{r.name:<24}{r.clients or '-':>8}{r.throughput:>10.0f}{_cell(r.x_ceiling, '.3g'):>10}"
            f"{_cell(r.x_noop, '.3g'):>8}{_cell(r.x_stock, '.3g'):>8}{r.p50_ms:>9.2f}"
            f"{r.p99_ms:>9.2f}{_cell(r.p99_x_stock, '.3g'):>10}{r.errors:>7}"
            f"{_cell(r.client_cpu_pct, '.0f'):>8}%{_cell(r.server_cpu_pct, '.0f'):>8}%")
    return "\n".join(lines)


def inprocess_rows(artifacts: Path, body: bytes, batch: int, seconds: float) -> list[Row]:
    return [Row(f"in-process {t.backend} b{t.batch}", 0, t.throughput, t.p50_ms, t.p99_ms,
                t.calls)
            for t in inprocess.measure(artifacts, body, sorted({1, batch}), seconds)]


def served_row(row: str, server: Server, model: str, payload: tuple[bytes, str],
               clients: int, seconds: int) -> Row:
    url = f"{server.url('inference')}/predictions/{model}"
    token = server.keys()["inference"]
    cpu0 = server_cpu_seconds(server.pid())
    run = wrk.run(url, *payload, token, clients, seconds)
    server_cpu = (server_cpu_seconds(server.pid()) - cpu0) / run.seconds * 100
    return Row(row, clients, run.throughput_rps, run.p50_ms, run.p99_ms, run.requests,
               run.errors, run.client_cpu_pct, server_cpu)


def check_answers(targets: dict) -> None:
    """One request per served row before timing: a benchmark of errors is no benchmark."""
    for row, (server, model, payload) in targets.items():
        answer = Client(server.url("inference"), server.keys()["inference"]).predict(
            model, *payload)
        if not answer.ok:
            raise RuntimeError(f"{row}: HTTP {answer.status}: {answer.body}")
        log.info("%s answers %s", row, json.dumps(answer.body)[:120])


def start_servers(name: str, stock_store: Path, run_root: Path,
                  models_dirs: list[Path]) -> tuple[Server, Server]:
    """Kiln's archive as `kiln serve NAME` serves it, and a stock TorchServe with the stock
    and no-op archives, started together; both on free ports, token auth on."""
    kiln = Server(ServerSettings(run_root / "kiln", STORE, [name], Ports.free(),
                                 models_dirs=models_dirs))
    names = [f"{name}_stock", f"{name}_noop"]
    # The no-op gets Kiln's workers and batching: the ceiling of the server as Kiln runs it,
    # so that no handler with those settings can beat it. The stock one, TorchServe's.
    plain = Server(stock.StockSettings(run_root / "stock", stock_store, names, Ports.free(),
                                       serving={names[1]: ModelServing()}))
    kiln.start()
    try:
        plain.start()
        kiln.wait_ready()
        plain.wait_ready()
    except BaseException:
        kiln.stop()
        plain.stop()
        raise
    return kiln, plain


def served_rows(decl: declaration.Declaration, artifacts: Path, payload: tuple[bytes, str],
                clients: list[int], seconds: int, models_dirs: list[Path]) -> list[Row]:
    name = decl.name
    stock_payload = stock.body(inprocess.model_input(artifacts, payload[0])[0])
    rows = []
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
        models = stock.build_all(name, decl.version, artifacts, Path(tmp) / "store")
        kiln, plain = start_servers(name, Path(tmp) / "store", Path(tmp), models_dirs)
        try:
            targets = {"kiln": (kiln, name, payload),
                       "stock": (plain, models["stock"], stock_payload),
                       "noop": (plain, models["noop"], stock_payload)}
            check_answers(targets)
            for row, (server, model, body) in targets.items():
                served_row(row, server, model, body, max(clients), 1)  # warm-up
                for n in clients:
                    log.info("%s: %d client(s) for %ds", row, n, seconds)
                    rows.append(served_row(row, server, model, body, n, seconds))
        finally:
            kiln.stop()
            plain.stop()
    return rows


def bench(decl: declaration.Declaration, clients: list[int], seconds: int,
          models_dirs: list[Path]) -> list[Row]:
    """The rows for the model `decl` declares, sent its first example; `models_dirs` find it
    by its name."""
    from kiln.model_store.build import ensure_built

    name = decl.name
    ensure_built(name, models_dirs=models_dirs)
    artifacts = ARTIFACTS / name
    first = payloads.first_payload(decl)
    payload = (first.body, first.content_type)
    batch = declared_serving(name, models_dirs).batch_size  # what `kiln serve NAME` batches
    rows = inprocess_rows(artifacts, first.body, batch, min(seconds, 3))
    rows += served_rows(decl, artifacts, payload, clients, seconds, models_dirs)
    return add_ratios(rows)


def report(name: str, rows: list[Row], seconds: int) -> dict:
    return {"model": name, "seconds": seconds, "load_generator": wrk.NAME,
            "ceiling": "best in-process row (ONNX Runtime / TorchScript, no HTTP, no decoding)",
            "kiln": "Kiln's handler, the normal archive (model_store/NAME.mar)",
            "stock": stock.DESCRIPTION,
            "noop": "Kiln's workers and batching with loadtests/noop_handler.py (answers a "
                    "constant, reads nothing)",
            "rows": [asdict(r) for r in rows]}


def run(args: argparse.Namespace) -> int:
    if not wrk.available():
        log.error("wrk is not installed: apt-get install wrk")
        return 1
    try:
        decl, models_dirs = declared.resolve(args.name, args.models_dirs)
        payloads.examples(decl)
    except declaration.DeclarationError as err:
        log.error("%s", err)
        return 1
    rows = bench(decl, sorted({1, args.clients}), args.seconds, models_dirs)
    result = report(decl.name, rows, args.seconds)
    print(f"{decl.name}: {args.seconds}s per cell, load generator: {wrk.NAME}")
    for key in ("ceiling", "kiln", "stock", "noop"):
        print(f"  {key:<8}{result[key]}")
    print(format_table(rows))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0
