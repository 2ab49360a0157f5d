"""Part 4: steady mixed load while memory is sampled."""

from __future__ import annotations

import contextlib
import logging
import math
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import requests

from kiln.deploy.server import Server
from kiln.loadtests.monitor import Sampler
from kiln.loadtests.studies.reliability.load import Mix
from kiln.loadtests.studies.reliability.served import (
    Models,
    oip_payload,
    rest_payload,
    worker_pids,
)
from kiln.loadtests.studies.reliability.table import Row, failures, statuses_text

log = logging.getLogger("kiln.reliability")

MB = 1024 * 1024


def pss_mb(pid: int) -> float | None:
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    found = re.search(r"^Pss:\s+(\d+) kB", text, re.M)
    return int(found[1]) / 1024 if found else None


@dataclass
class MemorySampler(Sampler):
    """RSS and PSS (MB) of the frontend and of each model's workers (summed; the pids are
    asked for at every sample, so a replaced worker is followed)."""

    server: Server | None = None
    models: list[str] = field(default_factory=list)

    def pids(self) -> dict[str, list[int]]:
        found = {"frontend": [self.server.pid()]}
        for name in self.models:
            with contextlib.suppress(requests.RequestException):
                found[f"{name} workers"] = [p for p, _ in worker_pids(self.server, name)
                                            if p > 0]
        return found

    def sample(self):
        values = {}
        for label, pids in self.pids().items():
            try:
                rss = sum(psutil.Process(p).memory_info().rss for p in pids) / MB
            except (psutil.Error, TypeError):
                continue
            pss = [pss_mb(p) for p in pids]
            values[label] = (rss, None if None in pss else sum(pss))
        self.samples.append((time.monotonic(), values))


def slope_per_100k(points: list[tuple[float, float]], rate: float) -> float | None:
    """Least-squares MB per second, as MB per 100k requests at `rate` requests per second."""
    if len(points) < 2 or rate <= 0:
        return None
    t, mb = np.asarray(points).T
    return float(np.polyfit(t, mb, 1)[0]) / rate * 1e5


def soak_rows(label: str, samples: list, rate: float) -> list[Row]:
    t0 = samples[0][0]
    rss = [(t - t0, v[label][0]) for t, v in samples if label in v]
    pss = [(t - t0, v[label][1]) for t, v in samples if label in v and v[label][1] is not None]
    rows = [Row(f"soak {label}: RSS", rss[-1][1], "MB", rss[0][1], "end, beside start"),
            Row(f"soak {label}: RSS max", max(m for _, m in rss), "MB"),
            Row(f"soak {label}: RSS slope", slope_per_100k(rss, rate), "MB/100k req",
                detail=f"{len(rss)} samples")]
    if pss:
        rows.append(Row(f"soak {label}: PSS", pss[-1][1], "MB", pss[0][1],
                        f"end, beside start; max {max(m for _, m in pss):.0f}"))
    else:
        rows.append(Row(f"soak {label}: PSS", None, "MB", detail="smaps_rollup unreadable"))
    return rows


def soak_mixes(server: Server, models: Models, opts) -> list[Mix]:
    token, rest, oip = server.keys()["inference"], [], []
    for name in models.image + models.features:
        p = rest_payload(name)
        rest.append((f"/predictions/{name}", p.body, p.content_type))
        if (o := oip_payload(name)) is not None:
            oip.append((f"/v2/models/{name}/infer", o.body, o.content_type))
    mixes = [Mix(server.url("inference"), rest, token, opts.clients, opts.soak_seconds)]
    if oip:
        mixes.append(Mix(server.url("oip"), oip, token, max(1, opts.clients // 2),
                         opts.soak_seconds))
    return mixes


def soak_part(server: Server, models: Models, opts) -> tuple[list[Row], list]:
    served = models.image + models.features
    log.info("soak: %ss of mixed load (%s, REST and OIP), memory sampled every %ss",
             opts.soak_seconds, ", ".join(served), opts.sample_seconds)
    sampler = MemorySampler(opts.sample_seconds, server=server, models=served).start()
    mixes = soak_mixes(server, models, opts)
    end = mixes[0].started + max(1, round(opts.soak_seconds))
    every = max(5.0, opts.soak_seconds / 20)
    while (left := end - time.monotonic()) > 0:
        time.sleep(min(left, every))
        latest = sampler.samples[-1][1].get("frontend", (math.nan,))[0]
        log.info("soak: %.0f/%ss, frontend RSS %.0f MB", min(opts.soak_seconds,
                 time.monotonic() - mixes[0].started), opts.soak_seconds, latest)
    loads = [m.finish() for m in mixes]
    sampler.stop()
    done = sum(x.run.requests for x in loads)
    statuses = sum((x.statuses for x in loads), Counter())
    socket_errors = sum(x.socket_errors for x in loads)
    seconds = max(x.run.seconds for x in loads)
    rows = [Row("soak: requests", done, "req", detail=f"{done / seconds:.0f} req/s over "
                f"{seconds:.0f}s, {len(loads)} wrk"),
            Row("soak: failed", failures(statuses) + socket_errors, "req",
                detail=statuses_text(statuses, socket_errors)),
            Row("soak: wrk CPU", sum(x.run.client_cpu_pct for x in loads), "% of a core")]
    for label in ["frontend", *(f"{m} workers" for m in served)]:
        rows += soak_rows(label, sampler.samples, done / seconds)
    t0 = sampler.samples[0][0]
    return rows, [(t - t0, v) for t, v in sampler.samples]
