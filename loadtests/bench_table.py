"""The pure parts of `kiln bench`: its rows, their ratios, the table and the summary lines."""

from __future__ import annotations

from dataclasses import dataclass

from kiln.deploy.server import ModelServing

INPROC = "in-process"
FRONT = "nginx -> TorchServe"
DIRECT = "TorchServe"
# The least nginx in front of TorchServe (loadtests/bare_proxy.py): what any proxy costs.
BARE = "bare nginx -> TorchServe"
PROXIED = (FRONT, BARE)  # the rows whose proxy's CPU is counted
# Kiln as `kiln serve NAME` (make serve) serves it, and the plain handler at its own best
# configuration: the pair that answers "is Kiln as users meet it as fast as what they would
# write?" (issue 21).
AS_SERVED = "kiln as served"
PLAIN_BEST = "plain best"
# Plain best behind the bare nginx: the floor a front proxy, any, costs at the top.
PLAIN_BEST_PROXIED = "plain best, bare proxy"


@dataclass
class Row:
    name: str
    clients: int  # 0: in-process, one caller
    throughput: float  # inputs per second
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int = 0
    client_cpu_pct: float | None = None  # wrk's, 100: one core
    server_cpu_pct: float | None = None  # TorchServe's (and nginx's, for a row through it)
    server_cpu_us: float | None = None  # the same CPU per request, in microseconds
    proxy_cpu_us: float | None = None  # nginx's share of it (master and workers; FRONT, BARE)
    via: str = INPROC
    config: str = ""  # workers, batch size and delay of a served row
    x_ceiling: float | None = None
    x_noop: float | None = None
    x_plain: float | None = None
    p99_x_plain: float | None = None
    x_best: float | None = None  # to the plain handler at its best, at the same concurrency


def config_name(serving: ModelServing) -> str:
    return f"w{serving.workers} b{serving.batch_size} d{serving.max_batch_delay_ms}"


def _ratio(a: float, b: Row | None, field: str = "throughput") -> float | None:
    base = getattr(b, field) if b else 0
    # Three significant figures: the in-process ceiling can be 1000x a served row.
    return float(f"{a / base:.3g}") if base else None


def add_ratios(rows: list[Row]) -> list[Row]:
    """Each row against the best in-process row; each served row also against the no-op and
    the plain rows of its own configuration and concurrency (none there: no ratio), and
    against the plain handler at its best at its concurrency."""
    inproc = [r for r in rows if r.via == INPROC]
    ceiling = max(inproc, key=lambda r: r.throughput) if inproc else None
    served = {(r.name, r.config, r.clients): r for r in rows if r.via != INPROC}
    best = {r.clients: r for r in rows if r.name == PLAIN_BEST}
    for r in rows:
        r.x_ceiling = _ratio(r.throughput, ceiling)
        if r.via == INPROC:
            continue
        noop = served.get(("noop", r.config, r.clients))
        plain = served.get(("plain", r.config, r.clients))
        r.x_noop = _ratio(r.throughput, noop)
        r.x_plain = _ratio(r.throughput, plain)
        r.p99_x_plain = _ratio(r.p99_ms, plain, "p99_ms")
        r.x_best = _ratio(r.throughput, best.get(r.clients))
    return rows


def _cell(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: list[Row]) -> str:
    head = (f"{'row':<28}{'via':<26}{'config':<20}{'clients':>7}{'inputs/s':>10}"
            f"{'x ceil':>10}{'x noop':>8}{'x plain':>8}{'p50 ms':>9}{'p99 ms':>9}"
            f"{'p99 x pl':>9}{'x best':>8}{'errors':>7}{'wrk CPU':>9}{'srv CPU':>9}"
            f"{'srv us/rq':>10}{'nginx us':>9}")
    lines = [head]
    for r in rows:
        lines.append(
            f"{r.name:<28}{r.via:<26}{r.config or '-':<20}{r.clients or '-':>7}"
            f"{r.throughput:>10.0f}{_cell(r.x_ceiling, '.3g'):>10}{_cell(r.x_noop, '.3g'):>8}"
            f"{_cell(r.x_plain, '.3g'):>8}{r.p50_ms:>9.2f}{r.p99_ms:>9.2f}"
            f"{_cell(r.p99_x_plain, '.3g'):>9}{_cell(r.x_best, '.3g'):>8}{r.errors:>7}"
            f"{_cell(r.client_cpu_pct, '.0f'):>8}%{_cell(r.server_cpu_pct, '.0f'):>8}%"
            f"{_cell(r.server_cpu_us, '.0f'):>10}{_cell(r.proxy_cpu_us, '.0f'):>9}")
    return "\n".join(lines)


def summary(rows: list[Row], config: str, clients: int) -> list[str]:
    """The comparison in words: Kiln against the plain handler and the no-op at `config` and
    `clients`, and the peak served row with the CPU wrk and the server used for it."""
    at = {r.name: r for r in rows if r.config == config and r.clients == clients}
    lines = [f"At {config}, {clients} clients:"]
    for name, what in (("kiln", "Kiln through nginx"),
                       ("kiln direct", "Kiln direct to TorchServe"),
                       ("plain", "plain handler")):
        r = at.get(name)
        if r is None:
            continue
        vs_plain = ("" if name == "plain" or r.x_plain is None else
                    f"{r.x_plain:.3g}x the plain handler's throughput "
                    f"(p99 {r.p99_x_plain:.3g}x), ")
        lines.append(f"  {what}: {r.throughput:.0f} inputs/s, {vs_plain}"
                     f"{_cell(r.x_noop, '.3g')}x the no-op's")
    served = [r for r in rows if r.via != INPROC and r.name != "noop"]
    if served:
        peak = max(served, key=lambda r: r.throughput)
        lines.append(f"Peak served: {peak.name} ({peak.via}, {peak.config}) at {peak.clients} "
                     f"clients, {peak.throughput:.0f} inputs/s, p99 {peak.p99_ms:.2f} ms; wrk "
                     f"used {_cell(peak.client_cpu_pct, '.0f')}% of a core, the server "
                     f"{_cell(peak.server_cpu_pct, '.0f')}%")
    return lines


def observability_summary(off: Row, on: Row, sample: float, rounds: int,
                          pair_ratios: list[float]) -> list[str]:
    """All of the observability on (traces and payloads sampled at `sample`) against all of
    it off, in words (loadtests/observability.py), with each pair of servers' own throughput
    ratio; issue 19 asks for at least 0.97x the throughput and at most +0.2 ms of p50."""
    cpu = (f"{on.server_cpu_us:.0f} vs {off.server_cpu_us:.0f} us a request "
           f"({_ratio(on.server_cpu_us, off, 'server_cpu_us')}x)"
           if on.server_cpu_us is not None and off.server_cpu_us is not None else "-")
    pairs = ", ".join(f"{r:.3f}x" for r in pair_ratios)
    return [f"Observability all on (traces and payloads sampled at {sample:.1%}) against all "
            f"off at {on.config}, {on.clients} clients "
            f"(medians of {rounds} rounds taking turns, in each of {len(pair_ratios)} pairs of "
            f"servers): throughput {_ratio(on.throughput, off)}x ({on.throughput:.0f} vs "
            f"{off.throughput:.0f} inputs/s; pair by pair {pairs}), p50 "
            f"{on.p50_ms - off.p50_ms:+.2f} ms, p99 {on.p99_ms - off.p99_ms:+.2f} ms, server "
            f"CPU {cpu}"]


def as_served_summary(rows: list[Row], rounds: int) -> list[str]:
    """Kiln as served against the plain handler at its best, at each concurrency, in words,
    with the floor: plain best itself behind the bare proxy."""
    at = {(r.name, r.clients): r for r in rows
          if r.name in (AS_SERVED, PLAIN_BEST, PLAIN_BEST_PROXIED)}
    lines = []
    for clients in sorted(n for name, n in at if name == AS_SERVED):
        kiln, plain = at[AS_SERVED, clients], at.get((PLAIN_BEST, clients))
        if plain is None:
            continue
        line = (f"Kiln as served ({kiln.config}, through nginx) against the plain handler at "
                f"its best ({plain.config}, straight to TorchServe), {clients} client(s), "
                f"medians of {rounds} rounds taking turns: {kiln.x_best}x "
                f"({kiln.throughput:.0f} vs {plain.throughput:.0f} inputs/s), p50 "
                f"{kiln.p50_ms:.2f} vs {plain.p50_ms:.2f} ms, server CPU "
                f"{_cell(kiln.server_cpu_us, '.0f')} vs {_cell(plain.server_cpu_us, '.0f')} us "
                f"a request, nginx's {_cell(kiln.proxy_cpu_us, '.0f')} of it")
        floor = at.get((PLAIN_BEST_PROXIED, clients))
        if floor is not None:
            line += (f"; plain best itself behind a bare nginx (the floor of any proxy): "
                     f"{floor.x_best}x, that nginx's {_cell(floor.proxy_cpu_us, '.0f')} us a "
                     f"request")
        lines.append(line)
    return lines
