"""Drift, live (issue 19): the handler's drift score against sets of inputs sent in turn.

    python -m kiln.loadtests.studies.drift [--requests 500] [--seed 0]

Serves lenet and binary (one worker each, so that one worker's window is the score) and sends
each model's sets, one request at a time, in this order: lenet the test split (shuffled),
the same digits inverted (dark on light, which the mnist framing turns back), then the digits
on a noisy grey background; binary the test rows (shuffled, repeated past its 114), then the
same rows with every feature scaled x2. After each answer it reads the worker's scores from
the metrics port (written before the answer left the worker) and prints, per set, the highest
score over its inputs' statistics at the end and over the set, and the request of the set at
which the score first went over drift.THRESHOLD. A set follows the one before it in the same
window, as traffic that changes does: N is the requests a change takes to be seen.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import requests

from kiln.client import Client
from kiln.deploy.server import ModelServing, Ports, Server, ServerSettings
from kiln.handlers import drift
from kiln.model_store.build import ensure_built
from kiln.workspace import Workspace

log = logging.getLogger("kiln.loadtests")
MODELS = ("lenet", "binary")
SCORE = re.compile(r'^kiln_input_drift_score\{([^}]*)\} (\S+)$', re.M)
LABEL = re.compile(r'(\w+)="([^"]*)"')


@dataclass
class Result:
    model: str
    name: str
    requests: int
    final: float  # the highest score over the statistics after the set's last request
    highest: float  # the highest over the set (NaN while no score yet)
    over_at: int | None  # the set's request at which a score first went over THRESHOLD
    worst: str  # the statistic with the highest final score


def png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def on_noisy_grey(digits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Light digits over a grey background (mean 128 of 255, spread 40), as a photographed
    scan might be: the ink stays the brightest, the framing finds no clean border."""
    background = np.clip(rng.normal(128, 40, digits.shape), 0, 255)
    return np.maximum(digits, background).astype(np.uint8)


def lenet_sets(count: int, rng: np.random.Generator) -> list[tuple[str, list[bytes]]]:
    from kiln.training import data

    test = data.load("mnist").test.x
    digits = test[rng.permutation(len(test))[:count]]
    return [("test split", [png(d) for d in digits]),
            ("inverted", [png(255 - d) for d in digits]),
            ("noisy grey background", [png(d) for d in on_noisy_grey(digits, rng)])]


def binary_sets(count: int, rng: np.random.Generator) -> list[tuple[str, list[bytes]]]:
    from kiln.training import data

    test = data.load("breast_cancer").test.x
    rows = np.resize(test[rng.permutation(len(test))], (count, test.shape[1]))
    return [("test split", [json.dumps(r.tolist()).encode() for r in rows]),
            ("features x2", [json.dumps((2 * r).tolist()).encode() for r in rows])]


SETS = {"lenet": (lenet_sets, "image/png"), "binary": (binary_sets, "application/json")}


def scores(page: str, model: str) -> dict[str, float]:
    """{"input/feature": score} of `model` on a metrics page."""
    found = {}
    for labels, value in SCORE.findall(page):
        named = dict(LABEL.findall(labels))
        if named.get("model_name") == model:
            found[f"{named['input']}/{named['feature']}"] = float(value)
    return found


def run_set(server: Server, client: Client, model: str, name: str, bodies: list[bytes],
            content_type: str) -> Result:
    metrics_url = f"{server.url('metrics')}/kiln-metrics"  # Kiln's alone: cheaper each time
    highest, over_at, now = float("nan"), None, {}
    for i, body in enumerate(bodies, start=1):
        answer = client.predict(model, body, content_type)
        if not answer.ok:
            raise RuntimeError(f"{model} {name} request {i}: {answer.status} {answer.body}")
        now = scores(requests.get(metrics_url, timeout=10).text, model)
        if now:
            top = max(now.values())
            highest = top if np.isnan(highest) else max(highest, top)
            if over_at is None and top > drift.THRESHOLD:
                over_at = i
    worst = max(now, key=now.get) if now else "-"
    return Result(model, name, len(bodies), now.get(worst, float("nan")), highest, over_at,
                  worst)


def study(server: Server, count: int, seed: int = 0, models=MODELS) -> list[Result]:
    client = Client(server.url("inference"), server.keys()["inference"])
    rng = np.random.default_rng(seed)
    results = []
    for model in models:
        make, content_type = SETS[model]
        for name, bodies in make(count, rng):
            results.append(run_set(server, client, model, name, bodies, content_type))
            log.info("%s", results[-1])
    return results


def table(results: list[Result]) -> str:
    lines = [f"threshold {drift.THRESHOLD}; window about {drift.WINDOW_ROWS} rows, scores after "
             f"{drift.MIN_ROWS}",
             f"{'model':<8}{'set':<24}{'requests':>9}{'final':>8}{'highest':>9}"
             f"{'over at':>9}  worst statistic"]
    for r in results:
        lines.append(f"{r.model:<8}{r.name:<24}{r.requests:>9}{r.final:>8.3f}{r.highest:>9.3f}"
                     f"{r.over_at if r.over_at else '-':>9}  {r.worst}")
    return "\n".join(lines)


def serve(run_dir: Path, models=MODELS) -> Server:
    """One worker per model, unbatched: the score is that worker's window. Each answer
    recorded as it leaves the worker (watch delay 0), so that the score read after it counts
    it; `kiln serve` records up to DEFAULT_WATCH_DELAY_MS later, with the same rows and scores.
    Every row goes to the drift sketches (drift rate 0), so that the requests until an alert
    count every request; `kiln serve` takes up to DEFAULT_DRIFT_ROWS_PER_S rows a second a
    worker, and leaves out the rest."""
    for model in models:
        ensure_built(model)
    one = ModelServing(workers=1, batch_size=1, max_batch_delay_ms=1)
    return Server(ServerSettings(run_dir, Workspace.current().model_store, list(models),
                                 Ports.free(), internal_ports=Ports.free(),
                                 serving={model: one for model in models}, watch_delay_ms=0,
                                 drift_rows_per_s=0))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=500, help="per set (default 500)")
    p.add_argument("--seed", type=int, default=0, help="order and noise (default 0)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tempfile.TemporaryDirectory(prefix="kiln-drift-") as run_dir:
        server = serve(Path(run_dir))
        with server.running(timeout=240):
            results = study(server, args.requests, args.seed)
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
