"""Sweep batch size, max batch delay, workers and backend: `kiln tune NAME --p99-ms X`.

One archive per backend; each variant is that archive registered through the management API
with the variant's workers and batching (serve-time settings, as `kiln serve` gives them),
and measured with wrk at --clients connections and at one. The grid and the client count are
fixed (bench_arguments.TUNE_*; flags may narrow them for a smoke run, and the report says so),
and the unbatched variant (1:0) is always in it. Rule: a variant qualifies when it answered
every request, its p99 stays under X both at load and at one client, and its one-client p50 is
at most ONE_CLIENT_CAP times the unbatched one's (same backend and workers): batching may buy
throughput at load, but not with more than half again the latency of an idle server. The pick
is the highest throughput at load, where variants within --tie of the best count as equal and
the lower one-client p50 wins.
The pick becomes the declaration's [serving] table: written to --out, and into the
declaration itself with --write-declaration.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
from dataclasses import asdict, dataclass
from itertools import product
from pathlib import Path

import requests
import yaml

from kiln.declaration import DeclarationError
from kiln.deploy.server import ModelServing, Ports, Server, ServerSettings
from kiln.loadtests import declared, payloads, serving_table, wrk
from kiln.loadtests.batching import parse_configs, register
from kiln.loadtests.bench_arguments import TUNE_CLIENTS, TUNE_CONFIGS, TUNE_WORKERS

log = logging.getLogger("kiln.tune")
BACKENDS = ("onnx", "torchscript")
UNBATCHED = (1, 0)
# A variant's one-client p50 over the unbatched one's, at most: the batch delay's cost.
ONE_CLIENT_CAP = 1.5


@dataclass(frozen=True)
class Variant:
    backend: str
    batch_size: int
    max_batch_delay_ms: int
    workers: int

    @property
    def name(self) -> str:
        return (f"{self.backend}_b{self.batch_size}_d{self.max_batch_delay_ms}"
                f"_w{self.workers}")

    def serving(self) -> ModelServing:
        """The variant as `kiln serve` settings (which refuse what it cannot serve)."""
        return ModelServing(workers=self.workers, batch_size=self.batch_size,
                            max_batch_delay_ms=self.max_batch_delay_ms)


@dataclass
class Trial:
    variant: Variant
    throughput: float  # at load
    p50_ms: float
    p99_ms: float
    one_p50_ms: float  # at one client
    one_p99_ms: float
    errors: int


def sweep(backends: list[str], configs: list[tuple[int, int]], workers: list[int]
          ) -> list[Variant]:
    """The grid, the unbatched configuration first whether listed or not."""
    configs = [UNBATCHED, *(c for c in configs if c != UNBATCHED)]
    return [Variant(b, bs, d, w) for b, (bs, d), w in product(backends, configs, workers)]


def grid_line(configs: str, workers: str, backends: str, clients: int) -> str:
    """The grid and load in words, and whether they are the fixed ones."""
    fixed = (configs, workers, clients) == (TUNE_CONFIGS, TUNE_WORKERS, TUNE_CLIENTS)
    return (f"Grid: batch:delay {configs} (1:0 always), workers {workers}, backends "
            f"{backends}; {clients} clients at load and 1 client. "
            + ("The fixed grid." if fixed else "Not the fixed grid (flags narrowed it): do "
               f"not compare with a report of the fixed one ({TUNE_CONFIGS}, workers "
               f"{TUNE_WORKERS}, {TUNE_CLIENTS} clients)."))


def unbatched_p50(trials: list[Trial]) -> dict[tuple[str, int], float]:
    """(backend, workers) -> one-client p50 of its unbatched trial."""
    return {(t.variant.backend, t.variant.workers): t.one_p50_ms for t in trials
            if (t.variant.batch_size, t.variant.max_batch_delay_ms) == UNBATCHED}


def one_client_ratio(t: Trial, base: dict[tuple[str, int], float]) -> float | None:
    """One-client p50 over the unbatched one's; None when there is no unbatched trial."""
    b = base.get((t.variant.backend, t.variant.workers))
    return t.one_p50_ms / b if b else None


def qualifies(t: Trial, p99_ms: float, base: dict[tuple[str, int], float]) -> bool:
    ratio = one_client_ratio(t, base)
    return (t.errors == 0 and t.p99_ms <= p99_ms and t.one_p99_ms <= p99_ms
            and ratio is not None and ratio <= ONE_CLIENT_CAP)


def choose(trials: list[Trial], p99_ms: float, tie: float = 0.05) -> Trial | None:
    """The rule in the module docstring; None when no trial qualifies."""
    base = unbatched_p50(trials)
    ok = [t for t in trials if qualifies(t, p99_ms, base)]
    if not ok:
        return None
    best = max(t.throughput for t in ok)
    close = [t for t in ok if t.throughput >= best * (1 - tie)]
    return min(close, key=lambda t: (t.one_p50_ms, -t.throughput))


def serving_values(variant: Variant) -> dict[str, int]:
    """The declaration's [serving] keys for `variant`."""
    return asdict(variant.serving())


def serve_command(name: str, v: Variant) -> str:
    backend = f" --backend {v.backend}" if v.backend != "onnx" else ""
    return (f"kiln serve {name}{backend} --workers {v.workers} --batch-size {v.batch_size} "
            f"--max-batch-delay {v.max_batch_delay_ms}")


def markdown(name: str, trials: list[Trial], pick: Trial | None, p99_ms: float,
             clients: int, seconds: int, grid: str = "") -> str:
    base = unbatched_p50(trials)
    lines = [f"# kiln tune {name}: p99 <= {p99_ms:g} ms", "",
             f"{len(trials)} trials, {seconds}s each at {clients} clients and at 1 client, "
             f"load generator: {wrk.NAME}.", *([grid] if grid else []), "",
             "Rule: every request answered, p99 <= the bound at load and at one client, "
             f"1-client p50 <= {ONE_CLIENT_CAP:g}x the unbatched variant's (same backend and "
             "workers); then the highest throughput at load, ties (within 5%) to the lower "
             "1-client p50.", "",
             f"| variant | backend | batch | delay ms | workers | req/s @{clients} "
             f"| p50 ms @{clients} | p99 ms @{clients} | p50 ms @1 | x b1 @1 | p99 ms @1 "
             "| errors | meets |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
             "| --- |"]
    for t in sorted(trials, key=lambda t: -t.throughput):
        v = t.variant
        mark = "**pick**" if t is pick else ("yes" if qualifies(t, p99_ms, base) else "no")
        ratio = one_client_ratio(t, base)
        lines.append(f"| {v.name} | {v.backend} | {v.batch_size} | {v.max_batch_delay_ms} "
                     f"| {v.workers} | {t.throughput:.0f} | {t.p50_ms:.2f} | {t.p99_ms:.2f} "
                     f"| {t.one_p50_ms:.2f} | {'-' if ratio is None else f'{ratio:.2f}'} "
                     f"| {t.one_p99_ms:.2f} | {t.errors} | {mark} |")
    lines.append("")
    if pick is None:
        lines.append(f"No variant keeps p99 under {p99_ms:g} ms: nothing written.")
    else:
        lines += [f"Pick: **{pick.variant.name}**: {pick.throughput:.0f} req/s at {clients} "
                  f"clients (p99 {pick.p99_ms:.2f} ms), {pick.one_p50_ms:.2f} ms p50 at 1 "
                  "client.", "", f"Serve it with: `{serve_command(name, pick.variant)}`, or "
                  "keep it in the declaration:", "", "```toml",
                  serving_table.table(serving_values(pick.variant)).rstrip("\n"), "```"]
        if pick.variant.backend != "onnx":
            lines += ["", f"A declaration names no backend: serve with `--backend "
                          f"{pick.variant.backend}`."]
    return "\n".join(lines) + "\n"


class TuneServer(Server):
    """A server whose workers share the cores as `kiln serve NAME` with `workers` would."""

    def __init__(self, settings: ServerSettings, workers: int):
        super().__init__(settings)
        self.workers = workers

    def served_workers(self) -> int:
        return self.workers


def build_store(name: str, backends: list[str], store: Path,
                models_dirs: list[Path]) -> dict[str, str]:
    """Backend -> archive file name in `store` (the same model, one archive per backend)."""
    from kiln.model_store import archive
    from kiln.model_store.build import ensure_built

    files = {}
    for backend in backends:
        built = (ensure_built(name, models_dirs=models_dirs) if backend == "onnx" else
                 archive.build(name, backend, store=store / backend, models_dirs=models_dirs))
        files[backend] = f"{name}_{backend}.mar"
        shutil.copyfile(built, store / files[backend])
    return files


def unregister(server: Server, name: str) -> None:
    requests.delete(f"{server.url('management')}/models/{name}", timeout=60,
                    headers={"Authorization": f"Bearer {server.keys()['management']}"}
                    ).raise_for_status()


def trial(server: Server, name: str, v: Variant, archive: str, payload: tuple[bytes, str],
          clients: int, seconds: int) -> Trial:
    register(server, name, v.name, v.batch_size, v.max_batch_delay_ms, v.workers, archive)
    try:
        url = f"{server.url('inference')}/predictions/{v.name}"
        token = server.keys()["inference"]
        wrk.run(url, *payload, token, clients, 1)  # warm-up
        load = wrk.run(url, *payload, token, clients, seconds)
        one = wrk.run(url, *payload, token, 1, seconds)
    finally:
        unregister(server, v.name)
    log.info("%s: %.0f req/s, p99 %.2f ms at %d; p50 %.2f ms at 1", v.name,
             load.throughput_rps, load.p99_ms, clients, one.p50_ms)
    return Trial(v, load.throughput_rps, load.p50_ms, load.p99_ms, one.p50_ms, one.p99_ms,
                 load.errors + one.errors)


def start_servers(store: Path, run_root: Path, workers: list[int]) -> dict[int, Server]:
    """One server per worker count, started together, registration on, token auth on."""
    servers = {}
    try:
        for w in sorted(set(workers)):
            settings = ServerSettings(run_root / f"w{w}", store, [], Ports.free(),
                                      enable_model_api=True)
            servers[w] = TuneServer(settings, w)
            servers[w].start()
        for server in servers.values():
            server.wait_ready()
    except BaseException:
        for server in servers.values():
            server.stop()
        raise
    return servers


def run_sweep(name: str, variants: list[Variant], payload: tuple[bytes, str], clients: int,
              seconds: int, models_dirs: list[Path]) -> list[Trial]:
    with tempfile.TemporaryDirectory(prefix="kiln-tune-") as tmp:
        store = Path(tmp) / "store"
        store.mkdir()
        files = build_store(name, sorted({v.backend for v in variants}), store, models_dirs)
        servers = start_servers(store, Path(tmp), [v.workers for v in variants])
        try:
            return [trial(servers[v.workers], name, v, files[v.backend], payload, clients,
                          seconds)
                    for v in variants]
        finally:
            for server in servers.values():
                server.stop()


def run(args: argparse.Namespace) -> int:
    if not wrk.available():
        log.error("wrk is not installed: apt-get install wrk")
        return 1
    backends = args.backends.split(",")
    if unknown := set(backends) - set(BACKENDS):
        log.error("unknown backend(s) %s: use %s", ", ".join(sorted(unknown)), BACKENDS)
        return 1
    try:
        decl, models_dirs = declared.resolve(args.name, args.models_dirs)
        first = payloads.first_payload(decl)
    except DeclarationError as err:
        log.error("%s", err)
        return 1
    workers = [int(w) for w in args.workers.split(",")]
    variants = sweep(backends, parse_configs(args.configs), workers)
    grid = grid_line(args.configs, args.workers, args.backends, args.clients)
    print(grid, flush=True)
    try:
        for v in variants:
            v.serving()
    except ValueError as err:  # a variant kiln serve could not reproduce
        log.error("%s", err)
        return 1
    trials = run_sweep(decl.name, variants, (first.body, first.content_type), args.clients,
                       args.seconds, models_dirs)
    pick = choose(trials, args.p99_ms)
    report = markdown(decl.name, trials, pick, args.p99_ms, args.clients, args.seconds, grid)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.md").write_text(report)
    (args.out / "trials.yaml").write_text(yaml.safe_dump(
        [{**asdict(t), "variant": {**asdict(t.variant), "name": t.variant.name}}
         for t in trials], sort_keys=False))
    (args.out / "serving.toml").unlink(missing_ok=True)
    print(report)
    if pick is None:
        return 1
    values = serving_values(pick.variant)
    (args.out / "serving.toml").write_text(serving_table.table(values))
    print(f"wrote {args.out / 'serving.toml'} and {args.out / 'report.md'}")
    if args.write_declaration:
        try:
            serving_table.rewrite(decl.path, values)
        except (serving_table.TableError, OSError) as err:
            log.error("%s: %s", decl.path, err)
            return 1
        print(f"wrote [serving] into {decl.path}")
    return 0
