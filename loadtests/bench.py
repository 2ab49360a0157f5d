"""One model, side by side in one run: `kiln bench NAME`.

Rows, each measured with wrk at one client and at --clients:
- in-process: the model alone in this process, no HTTP, no decoding (the ceiling);
- kiln: Kiln's archive as `kiln serve` runs it, through its front proxy (nginx) to TorchServe,
  Kiln's logging, at the comparison configuration (COMPARISON);
- kiln direct: the same server at the comparison configuration, straight to TorchServe's own
  port (like for like with plain);
- plain: loadtests/plain_handler.py on the same ONNX file, at the comparison configuration,
  straight to TorchServe, Kiln's logging (as Kiln's rows: like for like);
- noop: a handler that answers a constant at each configuration above, straight to
  TorchServe, Kiln's logging: the server's own ceiling there;
- stock: TorchServe's base_handler on TorchScript at TorchServe's defaults (stock.py);
- kiln as served / plain best: Kiln as `kiln serve NAME` (make serve) serves it on this machine
  (its declaration's [serving] over the defaults derived for its cores), through nginx, against
  the plain handler at its own best configuration (PLAIN_BEST_CONFIG), straight to
  TorchServe as released (PLAIN_BEST_TORCHSERVE), and the same plain best behind the least
  nginx that forwards (bare_proxy.py: the floor any front proxy costs); all up, taking turns,
  medians;
- kiln observability off / on: Kiln through its front proxy at the comparison configuration
  with request logging, spans, answer and drift metrics and the payload log all off, and all
  on as in production (observability.py), at the largest --clients only, taking turns;
- kiln oip http / kiln oip grpc: the Open Inference Protocol through the front proxy at the
  comparison configuration, binary tensors over HTTP beside raw tensors over gRPC, both loads
  from h2load (oip_bench.py).
Ratios: to the best in-process row, to the no-op and the plain rows of the same
configuration and concurrency, and to the plain handler at its best at the same concurrency.
Servers run one at a time, so that no idle one shares the CPU (but for the pairs taking turns).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from kiln import declaration
from kiln.client import Client
from kiln.deploy.server import HOST, LOG_CONFIG, ModelServing, Ports, Server, declared_serving
from kiln.handlers.cores import usable_cores
from kiln.loadtests import (
    bench_gpu,
    declared,
    inprocess,
    observability,
    oip_bench,
    payloads,
    stock,
    wrk,
)
from kiln.loadtests.bare_proxy import BareProxy
from kiln.loadtests.batching import server_cpu_seconds
from kiln.loadtests.bench_table import (
    AS_SERVED,
    BARE,
    DIRECT,
    FRONT,
    PLAIN_BEST,
    PLAIN_BEST_PROXIED,
    PROXIED,
    Row,
    add_ratios,
    as_served_summary,
    config_name,
    format_table,
    observability_summary,
    summary,
)
from kiln.workspace import Workspace

log = logging.getLogger("kiln.bench")
# Where Kiln and the plain handler are compared: the same workers and batching for both.
COMPARISON = ModelServing(workers=2, batch_size=16, max_batch_delay_ms=5)
STOCK_CONFIG = "TorchServe defaults"
# The plain handler's best on 2 cores (python -m kiln.loadtests.studies.plain_best, lenet, wrk
# at 16 and 32 clients). On TorchServe as released (--released, quiet machine, medians of 2
# rounds): w2 b8 d5 did 4,706 inputs/s at 16 clients (first, w2 b8 d1: 4,820) and 6,040 at 32
# (first, w2 b16 d5: 6,599, which was 4,187 at 16). Earlier, on Kiln's TorchServe at load
# average 9-14, w2 b8 d5 was among the first two at 16 and the first four at 32. TorchServe's own
# logging did no better than Kiln's log4j2.xml in either.
PLAIN_BEST_CONFIG = ModelServing(workers=2, batch_size=8, max_batch_delay_ms=5)
# What the plain handler runs on: TorchServe as a user without Kiln runs it, without what Kiln
# adds to it (its frontend's greedy batching, its workers' site hook); studies/plain_best.py
# --released runs the same.
PLAIN_BEST_TORCHSERVE = {"greedy_batching": False, "worker_site": False}
PLAIN_BEST_LOGS = LOG_CONFIG  # Kiln's; None would be TorchServe's own
# Rounds of Kiln as served and the plain handler at its best taking turns: the cores are
# shared, and the second of two runs in a row pays for the first's load.
AS_SERVED_ROUNDS = 3


@dataclass
class Target:
    """One served row: what it sends where."""

    name: str
    via: str
    config: str
    model: str
    payload: tuple[bytes, str]
    expect: str | None = None  # the label its answer must have; None: any answer
    proxy: BareProxy | None = None  # via BARE: the bare nginx in front of `server`

    def endpoint(self, server: Server) -> tuple[str, str]:
        """(base URL, inference token): the front proxy, the bare one (which adds
        TorchServe's token itself), or TorchServe's own port."""
        if self.proxy is not None:
            return self.proxy.url, ""
        if self.via == DIRECT and server.fronted:
            return (f"http://{HOST}:{server.settings.internal_ports.inference}",
                    server.torchserve_keys()["inference"])
        return server.url("inference"), server.keys()["inference"]


def inprocess_rows(artifacts: Path, body: bytes, batches: list[int], seconds: float
                   ) -> list[Row]:
    return [Row(f"in-process {t.backend} b{t.batch}", 0, t.throughput, t.p50_ms, t.p99_ms,
                t.calls)
            for t in inprocess.measure(artifacts, body, batches, seconds)]


def proxy_cpu(server: Server, target: Target) -> float:
    """CPU seconds of nginx's processes (master and workers) for a row through Kiln's front
    or the bare proxy, else 0."""
    if target.proxy is not None:
        return server_cpu_seconds(target.proxy.proc.pid)
    return server_cpu_seconds(server.front.pid()) if target.via == FRONT else 0.0


def server_cpu(server: Server, target: Target) -> float:
    """CPU seconds of TorchServe's processes, and of nginx's for a row that goes through it."""
    return server_cpu_seconds(server.pid()) + proxy_cpu(server, target)


def served_row(target: Target, server: Server, clients: int, seconds: int,
               cpu_seconds=None) -> Row:
    """wrk's figures, and the server's CPU (`cpu_seconds(server)`, else server_cpu's)."""
    def cpu_now():
        return cpu_seconds(server) if cpu_seconds else server_cpu(server, target)

    base, token = target.endpoint(server)
    cpu0, proxy0 = cpu_now(), proxy_cpu(server, target)
    run = wrk.run(f"{base}/predictions/{target.model}", *target.payload, token, clients,
                  seconds)
    cpu, proxy = cpu_now() - cpu0, proxy_cpu(server, target) - proxy0
    requests = max(1, run.requests)
    return Row(target.name, clients, run.throughput_rps, run.p50_ms, run.p99_ms, run.requests,
               run.errors, run.client_cpu_pct, cpu / run.seconds * 100, cpu * 1e6 / requests,
               proxy * 1e6 / requests if target.via in PROXIED else None, via=target.via,
               config=target.config)


def check_answer(target: Target, server: Server) -> None:
    """One request before timing: a benchmark of errors (or of wrong answers) is no
    benchmark."""
    answer = Client(*target.endpoint(server)).predict(target.model, *target.payload)
    problem = None if answer.ok else f"HTTP {answer.status}: {answer.body}"
    if answer.ok and target.expect is not None:
        problem = payloads.rest_problem(answer.body, target.expect)
    if problem:
        raise RuntimeError(f"{target.name} ({target.config}): {problem}")
    log.info("%s (%s) answers %s", target.name, target.config, json.dumps(answer.body)[:120])


def measure_server(server: Server, targets: list[Target], clients: list[int],
                   seconds: int) -> list[Row]:
    rows = []
    try:  # stopped also when it fails half-way through starting (Server.running would not)
        server.start()
        server.wait_ready()
        for target in targets:
            check_answer(target, server)
            served_row(target, server, max(clients), 1)  # warm-up
            for n in clients:
                log.info("%s (%s, %s): %d client(s) for %ds", target.name, target.config,
                         target.via, n, seconds)
                rows.append(served_row(target, server, n, seconds))
    finally:
        server.stop()
    return rows


def observability_targets(name: str, payload: payloads.Payload) -> dict[str, Target]:
    """The pair's rows, {row: Target} (observability.ROWS): the same model and body through
    the front."""
    return {row: Target(row, FRONT, config_name(COMPARISON), name,
                        (payload.body, payload.content_type), payload.label)
            for row in observability.ROWS}


def observability_rows(name: str, payload: payloads.Payload, clients: int, seconds: int,
                       root: Path, models_dirs: list[Path]
                       ) -> tuple[list[Row], dict[str, list[float]]]:
    """The observability pair (observability.py), PAIRS times with fresh servers: the off and
    on rows (medians of every round of every pair) and, for each on row, each pair's
    throughput ratio to the off row."""
    targets = observability_targets(name, payload)
    runs = {row: [] for row in targets}
    ratios = {row: [] for row in targets if row != observability.OFF}
    with observability.otlp_sink() as sink:
        for pair in range(observability.PAIRS):
            found = observability_pair(targets, pair, clients, seconds, root, models_dirs, sink)
            for row, rounds in found.items():
                runs[row] += rounds
            off = observability.median_row(found[observability.OFF]).throughput
            for row, pair_ratios in ratios.items():
                pair_ratios.append(observability.median_row(found[row]).throughput / off)
    return [observability.median_row(r) for r in runs.values()], ratios


def observability_pair(targets: dict[str, Target], pair: int, clients: int, seconds: int,
                       root: Path, models_dirs: list[Path], sink: str,
                       rounds: int = observability.ROUNDS, measure=None) -> dict[bool, list]:
    """One pair of servers, off and on (one per row of `targets`): all up and warm, then
    `rounds` turns each; {row: what measure(target, server, clients, seconds) gave each
    turn}, by default a Row with
    the server's CPU (loadtests/studies/observability_pairs.py splits it by process)."""
    if measure is None:
        def measure(target, server, clients, seconds):
            return served_row(target, server, clients, seconds,
                              observability.serving_cpu_seconds)
    runs = {row: [] for row in targets}
    with contextlib.ExitStack() as running:
        servers = {row: observability.server(root / f"pair-{pair}", targets[row].model,
                                             COMPARISON, models_dirs, row, sink)
                   for row in targets}
        for row, server in servers.items():
            running.enter_context(server.running(timeout=240))
            check_answer(targets[row], server)
        for row, server in servers.items():  # all warm before any is measured
            measure(targets[row], server, clients, observability.WARM_UP_ROUNDS * seconds)
        for turn in range(rounds):
            # In order, then in reverse: none always runs just after another's load.
            for row, server in sorted(servers.items(), reverse=turn % 2 == 1):
                log.info("%s: %d clients for %ds, pair %d, round %d", row, clients, seconds,
                         pair + 1, turn + 1)
                runs[row].append(measure(targets[row], server, clients, seconds))
    return runs


def kiln_server(root: Path, name: str, config: ModelServing, models_dirs: list[Path]) -> Server:
    """Kiln's archive of `name` at `config`, behind its front proxy, as `kiln serve` runs it."""
    tag = config_name(config).replace(" ", "")
    return Server(stock.BenchSettings(
        root / f"kiln-{tag}", Workspace.current().model_store, [name], Ports.free(),
        models_dirs=models_dirs, internal_ports=Ports.free(), serving={name: config}))


def plan(decl: declaration.Declaration, serve: ModelServing, artifacts: Path, root: Path,
         payload: payloads.Payload, models_dirs: list[Path]) -> list[tuple[Server, list]]:
    """The servers, in the order they run, each with its rows (Kiln as served: as_served_rows);
    `serve` only gets its no-op row here."""
    name, store = decl.name, root / "store"
    store.mkdir(parents=True)
    body = (payload.body, payload.content_type)
    configs = [COMPARISON, *([serve] if serve != COMPARISON else [])]
    cmp_name = config_name(COMPARISON)

    def target(row: str, via: str, config: ModelServing, model: str, expect=payload.label):
        return Target(row, via, config_name(config), model, body, expect)

    servers = [(kiln_server(root, name, COMPARISON, models_dirs),
                [target("kiln", FRONT, COMPARISON, name),
                 target("kiln direct", DIRECT, COMPARISON, name)])]
    plain = stock.build_plain(name, decl.version, artifacts, store)
    servers.append((Server(stock.BenchSettings(
        root / "plain", store, [plain], Ports.free(), serving={plain: COMPARISON})),
        [target("plain", DIRECT, COMPARISON, plain)]))
    noops = {stock.build_noop(name, decl.version, artifacts, store,
                              config_name(c).replace(" ", "")): c for c in configs}
    servers.append((Server(stock.BenchSettings(root / "noop", store, list(noops), Ports.free(),
                                               serving=noops)),
                    [target("noop", DIRECT, c, m, None) for m, c in noops.items()]))
    stock_name = stock.build_stock(name, decl.version, artifacts, store)
    stock_body = stock.body(inprocess.model_input(artifacts, payload.body)[0])
    servers.append((Server(stock.BenchSettings(
        root / "stock", store, [stock_name], Ports.free(), log_config=None, envelope="json")),
        [Target("stock", DIRECT, STOCK_CONFIG, stock_name, stock_body)]))
    log.info("comparison configuration %s; kiln serve %s uses %s", cmp_name, name,
             config_name(serve))
    return servers


def plain_best_server(run_dir: Path, store: Path, plain: str) -> Server:
    """The plain handler's archive `plain` (in `store`) at its best configuration here, on
    TorchServe as released: kiln bench's "plain best"."""
    return Server(stock.BenchSettings(run_dir, store, [plain], Ports.free(),
                                      serving={plain: PLAIN_BEST_CONFIG},
                                      log_config=PLAIN_BEST_LOGS, **PLAIN_BEST_TORCHSERVE))


def as_served_rows(decl: declaration.Declaration, serve: ModelServing, artifacts: Path,
                   root: Path, payload: payloads.Payload, models_dirs: list[Path],
                   clients: list[int], seconds: int) -> list[Row]:
    """Kiln as served (`serve`, through nginx), the plain handler at its best, and the same
    plain best behind the bare proxy, all up, taking turns AS_SERVED_ROUNDS times at each
    concurrency, the order reversed every round; each cell the median of its rounds."""
    store = root / "plain-best-store"
    store.mkdir(parents=True)
    plain = stock.build_plain(decl.name, decl.version, artifacts, store)
    body = (payload.body, payload.content_type)
    plain_server = plain_best_server(root / "plain-best", store, plain)
    plain_target = Target(PLAIN_BEST, DIRECT, config_name(PLAIN_BEST_CONFIG), plain, body,
                          payload.label)
    cells = [(kiln_server(root / "as-served", decl.name, serve, models_dirs),
              Target(AS_SERVED, FRONT, config_name(serve), decl.name, body, payload.label)),
             (plain_server, plain_target)]
    with contextlib.ExitStack() as running:
        for server, _ in cells:
            running.enter_context(server.running(timeout=240))
        # The bare proxy adds TorchServe's token, known once the server is up.
        proxy = running.enter_context(BareProxy(root / "bare-proxy",
                                                *plain_target.endpoint(plain_server)))
        cells.append((plain_server, replace(plain_target, name=PLAIN_BEST_PROXIED, via=BARE,
                                            proxy=proxy)))
        runs = {(target.name, n): [] for _, target in cells for n in clients}
        for server, target in cells:
            check_answer(target, server)
            served_row(target, server, max(clients), 1)  # warm-up
        for turn in range(AS_SERVED_ROUNDS):
            for n in clients:
                for server, target in cells[::-1] if turn % 2 else cells:
                    log.info("%s (%s): %d client(s) for %ds, round %d", target.name,
                             target.config, n, seconds, turn + 1)
                    runs[target.name, n].append(served_row(target, server, n, seconds))
    return [observability.median_row(r) for r in runs.values()]


def kiln_serve_config(name: str, models_dirs: list[Path]) -> ModelServing:
    """What `kiln serve NAME` (make serve) serves `name` alone with on this machine."""
    return declared_serving(name, models_dirs, ModelServing.derived(usable_cores(), 1))


def bench(decl: declaration.Declaration, clients: list[int], seconds: int,
          models_dirs: list[Path]) -> tuple[list[Row], ModelServing, bench_gpu.Section,
                                            dict[str, list[float]]]:
    """The rows for the model `decl` declares, sent its first example, and its GPU section;
    `models_dirs` find it by its name. Also what `kiln serve NAME` serves it with, and the
    observability pairs' throughput ratios, each on row to off, one a pair."""
    from kiln.model_store.build import ensure_built

    name = decl.name
    ensure_built(name, models_dirs=models_dirs)
    artifacts = Workspace.current().exports(name)
    first = payloads.first_payload(decl)
    serve = kiln_serve_config(name, models_dirs)
    batches = sorted({1, serve.batch_size, COMPARISON.batch_size})
    rows = inprocess_rows(artifacts, first.body, batches, min(seconds, 3))
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
        for server, targets in plan(decl, serve, artifacts, Path(tmp), first, models_dirs):
            rows += measure_server(server, targets, clients, seconds)
        rows += as_served_rows(decl, serve, artifacts, Path(tmp), first, models_dirs, clients,
                               seconds)
        pair_rows, pair_ratios = observability_rows(name, first, max(clients), seconds,
                                                    Path(tmp), models_dirs)
        rows += pair_rows
        rows += oip_bench.rows(decl, COMPARISON, clients, seconds, Path(tmp), models_dirs)
    gpu = gpu_section(decl, first, sorted({1, COMPARISON.batch_size}), clients, seconds,
                      models_dirs)
    return add_ratios(rows), serve, gpu, pair_ratios


def gpu_section(decl: declaration.Declaration, first: payloads.Payload, batches: list[int],
                clients: list[int], seconds: int, models_dirs: list[Path]) -> bench_gpu.Section:
    """In-process rows on cuda:0, then Kiln's ONNX and TorchScript archives served on one GPU
    at the comparison configuration, through the front proxy; skipped without CUDA."""
    from kiln.model_store import archive

    artifacts = Workspace.current().exports(decl.name)
    section = bench_gpu.inprocess_rows(artifacts, first.body, batches, min(seconds, 3))
    if not section.ran:
        return section
    with tempfile.TemporaryDirectory(prefix="kiln-bench-gpu-") as tmp:
        ts_store = Path(tmp) / "store"
        archive.build(decl.name, "torchscript", store=ts_store, models_dirs=models_dirs)
        stores = (("onnx", Workspace.current().model_store), ("torchscript", ts_store))
        for backend, store in stores:
            server = Server(stock.BenchSettings(
                Path(tmp) / backend, store, [decl.name], Ports.free(), models_dirs=models_dirs,
                internal_ports=Ports.free(), serving={decl.name: COMPARISON}, gpus=1))
            target = Target(f"kiln {backend} {bench_gpu.DEVICE}", FRONT,
                            config_name(COMPARISON), decl.name,
                            (first.body, first.content_type), first.label)
            section.rows += measure_server(server, [target], clients, seconds)
    add_ratios(section.rows)
    return section


def descriptions(name: str, serve: ModelServing) -> dict[str, str]:
    return {
        "ceiling": "best in-process row (ONNX Runtime / TorchScript on the CPU, no HTTP, no "
                   "decoding)",
        "kiln": f"Kiln's handler, its archive (model_store/{name}.mar), Kiln's logging, "
                f"through Kiln's front proxy (nginx) as `kiln serve` runs it",
        "kiln direct": "the same Kiln server, straight to TorchServe's own port",
        "plain": "loadtests/plain_handler.py (PIL, numpy, one ONNX Runtime call per batch) on "
                 "the same model.onnx, Kiln's logging, straight to TorchServe",
        "noop": "loadtests/noop_handler.py (answers a constant, reads nothing), Kiln's "
                "logging, straight to TorchServe: the server's ceiling at that configuration",
        "stock": stock.DESCRIPTION,
        AS_SERVED: f"`kiln serve {name}` (make serve) as it is on this machine, "
                   f"{config_name(serve)}, through nginx; medians of {AS_SERVED_ROUNDS} rounds "
                   f"taking turns with plain best",
        PLAIN_BEST: f"the plain handler at its best configuration here, "
                    f"{config_name(PLAIN_BEST_CONFIG)}, "
                    f"{'TorchServe' if PLAIN_BEST_LOGS is None else 'Kiln'}'s logging, "
                    "straight to TorchServe as released (no greedy batching, no worker site)",
        PLAIN_BEST_PROXIED: "the same plain best behind the least nginx that forwards (one "
                            "worker, kept-alive upstream connections, no log, no key check, "
                            "no header of its own: loadtests/bare_proxy.py), taking turns "
                            "with the two above: what any front proxy costs",
        observability.OFF: f"Kiln through nginx at {config_name(COMPARISON)} without the "
                           "access log, spans, answer and drift metrics or payload log "
                           "(request id, traceparent and Server-Timing stay); server CPU: "
                           "TorchServe, its workers, nginx and Kiln's helper processes",
        observability.ON: f"the same with all of them on: the JSON access log, OTLP spans "
                          f"of {observability.SAMPLES[observability.ON]:.0%} of the traces to "
                          f"a local sink, answer and drift metrics, the payload log at "
                          f"{observability.SAMPLES[observability.ON]:g}; medians of "
                          f"{observability.ROUNDS} rounds taking turns with the off row, in "
                          f"each of {observability.PAIRS} pairs of fresh servers",
        observability.SPARSE: f"the same with traces and payloads sampled at "
                              f"{observability.SAMPLES[observability.SPARSE]:.1%}, taking "
                              f"turns with the two above",
        oip_bench.HTTP_ROW: f"the Open Inference Protocol over HTTP through nginx at "
                            f"{config_name(COMPARISON)}: the first example as one tensor, "
                            f"binary in and out (tritonclient's default); load from "
                            f"{oip_bench.h2load.NAME}",
        oip_bench.GRPC_ROW: "the same over gRPC (inference.GRPCInferenceService, "
                            "raw_input_contents in, raw_output_contents out), the same h2load",
        "config": "wN bN dN: workers, batch size, max batch delay in ms",
    }


def report(name: str, rows: list[Row], seconds: int, serve: ModelServing,
           gpu: bench_gpu.Section, pair_ratios: dict[str, list[float]]) -> dict:
    return {"model": name, "seconds": seconds, "load_generator": wrk.NAME,
            "comparison": config_name(COMPARISON), "kiln_serve": config_name(serve),
            **descriptions(name, serve), "rows": [asdict(r) for r in rows],
            "observability_pair_ratios": {row: [round(r, 3) for r in ratios]
                                          for row, ratios in pair_ratios.items()},
            "gpu": {"notes": gpu.notes, "rows": [asdict(r) for r in gpu.rows]}}


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
    clients = sorted({1, *args.clients})
    rows, serve, gpu, pair_ratios = bench(decl, clients, args.seconds, models_dirs)
    result = report(decl.name, rows, args.seconds, serve, gpu, pair_ratios)
    print(f"{decl.name}: {args.seconds}s per cell, load generator: {wrk.NAME}")
    for key, text in descriptions(decl.name, serve).items():
        print(f"  {key:<11} {text}")
    print(format_table(rows))
    for n in clients[1:]:
        print("\n".join(summary(rows, config_name(COMPARISON), n)))
    print("\n".join(as_served_summary(rows, AS_SERVED_ROUNDS)))
    pair = {r.name: r for r in rows if r.name in observability.ROWS}
    for row, ratios in pair_ratios.items():
        print("\n".join(observability_summary(pair[observability.OFF], pair[row],
                                               observability.SAMPLES[row],
                                               observability.ROUNDS, ratios)))
    print("\n".join(bench_gpu.lines(gpu)))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0
