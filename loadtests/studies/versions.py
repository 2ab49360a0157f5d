"""Two measurements behind `kiln deploy` and `kiln retire` (deploy/lifecycle.py), on lenet.

- warm-up: the first 100 sequential answers of a freshly registered version, with and without
  Kiln's warm-up, beside the default version's steady figures;
- unregister: what TorchServe does with the requests a version holds when it is unregistered
  (or scaled to 0 workers) under load.

    python -m kiln.loadtests.studies.versions [--trials 3]

It serves from a temporary folder: lenet.mar as built, and lenet-2.0.mar from the same export.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import requests
from PIL import Image

from kiln import declaration
from kiln.deploy import lifecycle
from kiln.deploy.ports import Ports
from kiln.deploy.server import Server, ServerSettings
from kiln.handlers import limits

NAME = "lenet"
IN_FLIGHT = 24


def timings(target: lifecycle.Target, v: str, n: int = 100) -> np.ndarray:
    """Milliseconds of n sequential requests pinned to version v, on one connection."""
    body = declaration.get(NAME).examples[0].body()
    url = f"{target.inference_url}/predictions/{NAME}/{v}"
    headers = {"Authorization": f"Bearer {target.inference_token}",
               "Content-Type": "image/png"}
    out = []
    with requests.Session() as session:
        for _ in range(n):
            started = time.perf_counter()
            r = session.post(url, data=body, headers=headers, timeout=30)
            out.append((time.perf_counter() - started) * 1e3)
            r.raise_for_status()
    return np.array(out)


def shown(ms: np.ndarray) -> str:
    return (f"first {ms[0]:6.1f}  p50 {np.percentile(ms, 50):6.1f}  "
            f"p99 {np.percentile(ms, 99):6.1f}  max {ms.max():6.1f} ms")


def warm_up(target: lifecycle.Target, like: dict, trials: int) -> None:
    timings(target, "1.0", 200)
    print(f"1.0 steady         {shown(timings(target, '1.0', 500))}")
    for _ in range(trials):
        target.management.register(f"{NAME}-2.0.mar", like)
        print(f"2.0 cold           {shown(timings(target, '2.0'))}")
        target.management.unregister(NAME, "2.0")
        target.management.register(f"{NAME}-2.0.mar", like)
        started = time.perf_counter()
        sent = lifecycle.warm(target, NAME, "2.0", int(like["batchSize"]))
        took = time.perf_counter() - started
        print(f"2.0 warmed         {shown(timings(target, '2.0'))}   "
              f"(warm-up: {sent} requests, {took:.2f} s)")
        target.management.unregister(NAME, "2.0")


def big_png() -> bytes:
    """A noise image just under the pixels a busy worker still admits (handlers/limits.py)."""
    side = int(limits.CHEAP_REQUEST_PIXELS ** 0.5) - 24
    out = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (side, side), dtype=np.uint8)
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def unregister(target: lifecycle.Target, like: dict, scale_first: bool) -> None:
    """IN_FLIGHT requests pinned to 2.0, then (once one is answered) 2.0 unregistered."""
    target.management.register(f"{NAME}-2.0.mar", like)
    url = f"{target.inference_url}/predictions/{NAME}/2.0"
    headers = {"Authorization": f"Bearer {target.inference_token}",
               "Content-Type": "image/png"}
    body = big_png()

    def post() -> str:
        try:
            return str(requests.post(url, data=body, headers=headers, timeout=20).status_code)
        except requests.RequestException:
            return "no answer in 20 s"

    with concurrent.futures.ThreadPoolExecutor(IN_FLIGHT) as pool:
        jobs = [pool.submit(post) for _ in range(IN_FLIGHT)]
        next(concurrent.futures.as_completed(jobs))
        if scale_first:
            target.management.call("PUT", f"/models/{NAME}/2.0", min_worker=0, max_worker=0,
                                   synchronous="true")
        target.management.unregister(NAME, "2.0")
        counts = Counter(job.result() for job in jobs)
    how = "scaled to 0, then unregistered" if scale_first else "unregistered"
    print(f"{how:<31} {dict(sorted(counts.items()))}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3, help="warm-up trials (default: 3)")
    args = parser.parse_args(argv)
    from kiln.model_store.build import ensure_built

    with tempfile.TemporaryDirectory(prefix="kiln-versions-") as tmp:
        store = Path(tmp, "store")
        store.mkdir()
        shutil.copy(ensure_built(NAME), store / f"{NAME}.mar")
        ensure_built(NAME, store=store, version="2.0")
        server = Server(ServerSettings(run_dir=Path(tmp, "run"), model_store=store,
                                       models=[NAME], ports=Ports.free(),
                                       internal_ports=Ports.free(), enable_model_api=True))
        with server.running():
            target = lifecycle.Target.of(server.run_dir, store)
            like = target.management.describe(NAME, "1.0")
            warm_up(target, like, args.trials)
            for scale_first in (False, True):
                unregister(target, like, scale_first)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
