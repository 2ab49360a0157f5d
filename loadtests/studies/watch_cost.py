"""What watching the answers and the drift costs the handler (issue 19), in this process.

    python -m kiln.loadtests.studies.watch_cost [--calls 2000] [--rounds 3]

Runs Kiln's handler on lenet (a PNG per request) and binary (a JSON row), their declarations'
first examples, from the workspace's exports, through a stand-in TorchServe context, with
metrics recorded as a worker
records them (prometheus-client's multiprocess files in a temporary folder), and prints the
handler's time per request at batch 1 and at batch 16, with handlers/watch.py's Watch on and
off in alternating rounds (the best round of each: the machine's noise only adds). The
difference is what one batch's observe() costs, spread over its requests.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from kiln import declaration
from kiln.workspace import Workspace

MODELS = ("lenet", "binary")
BATCHES = (1, 16)


def handler_for(model: str):
    """An initialised KilnHandler of the workspace's export of `model`, and its context."""
    from ts.context import Context

    from kiln.handlers.handler import KilnHandler

    folder = Workspace.current().exports(model)
    manifest = {"model": {"modelName": model, "serializedFile": "model.onnx",
                          "handler": "handler.py", "modelVersion": "1.0"}}
    context = Context(model, str(folder), manifest, 1, None, "0.12.0",
                      limit_max_image_pixels=True, metrics=None,
                      model_yaml_config={"handler": {"intra_op_threads": 1}})
    handler = KilnHandler()
    handler.initialize(context)
    return handler, context


def per_request_us(handler, context, body: bytes, batch: int, calls: int) -> float:
    from ts.context import RequestProcessor

    data = [{"body": body}] * batch
    context.request_processor = [RequestProcessor({}) for _ in data]
    for _ in range(20):
        handler.handle(data, context)
    started = time.perf_counter()
    for _ in range(calls):
        handler.handle(data, context)
    return (time.perf_counter() - started) / (calls * batch) * 1e6


def measure(model: str, calls: int, rounds: int) -> dict[tuple[int, str], float]:
    from kiln.handlers import watch

    handler, context = handler_for(model)
    on = handler.watch
    off = watch.Watch()
    body = declaration.get(model).examples[0].body()  # its declaration's first example
    best: dict[tuple[int, str], float] = {}
    for batch in BATCHES:
        for _ in range(rounds):
            for name, watching in (("off", off), ("on", on)):
                handler.watch = watching
                us = per_request_us(handler, context, body, batch, max(1, calls // batch))
                best[(batch, name)] = min(best.get((batch, name), float("inf")), us)
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=2000, help="requests per round (default 2000)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of each (default 3)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kiln-watch-cost-") as folder:
        # Before prometheus-client is imported: it picks its file-backed values then.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
        print(f"{'model':<8}{'batch':>6}{'off us/req':>12}{'on us/req':>11}{'cost us':>9}")
        for model in MODELS:
            best = measure(model, args.calls, args.rounds)
            for batch in BATCHES:
                off, on = best[(batch, "off")], best[(batch, "on")]
                print(f"{model:<8}{batch:>6}{off:>12.1f}{on:>11.1f}{on - off:>9.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
