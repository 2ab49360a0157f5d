"""What watching the answers and the drift costs the handler (issue 19), in this process.

    python -m kiln.loadtests.studies.watch_cost [--calls 2000]

Runs Kiln's handler on lenet (a PNG per request) and binary (a JSON row), their declarations'
first examples, from the workspace's exports, through a stand-in TorchServe context, with
metrics recorded as a worker
records them (prometheus-client's multiprocess files in a temporary folder), and prints the
handler's mean time per request at batch 1 and at batch 16, with handlers/watch.py's Watch
on and off call by call (a shared machine's noise falls on both alike). The difference is
what watching costs a request: each batch's queueing and, once every 256 rows, the recording
of the queue.
"""

from __future__ import annotations

import argparse
import os
import statistics
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


def per_request_us(handler, context, body: bytes, batch: int, calls: int,
                   watches: dict) -> dict[str, float]:
    """{name: mean microseconds per request} of handle() calls with each watch in turn,
    call by call, so that both see the same noise of a shared machine."""
    from ts.context import RequestProcessor

    data = [{"body": body}] * batch
    context.request_processor = [RequestProcessor({}) for _ in data]
    times = {name: [] for name in watches}
    for _ in range(calls):
        for name, watching in watches.items():
            handler.watch = watching
            started = time.perf_counter()
            handler.handle(data, context)
            times[name].append(time.perf_counter() - started)
    # The mean, not the median: the watch records its queue once every 256 rows, so the
    # median call is one that only queues.
    return {name: statistics.fmean(t) / batch * 1e6 for name, t in times.items()}


def measure(model: str, calls: int) -> dict[tuple[int, str], float]:
    from kiln.handlers import watch

    handler, context = handler_for(model)
    watches = {"off": watch.Watch(), "on": handler.watch}
    body = declaration.get(model).examples[0].body()  # its declaration's first example
    found = {}
    for batch in BATCHES:
        per_request_us(handler, context, body, batch, 20, watches)  # warm up
        for name, us in per_request_us(handler, context, body, batch,
                                       max(1, calls // batch), watches).items():
            found[(batch, name)] = us
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=2000, help="requests per round (default 2000)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kiln-watch-cost-") as folder:
        # Before prometheus-client is imported: it picks its file-backed values then.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
        print(f"{'model':<8}{'batch':>6}{'off us/req':>12}{'on us/req':>11}{'cost us':>9}")
        for model in MODELS:
            found = measure(model, args.calls)
            for batch in BATCHES:
                off, on = found[(batch, "off")], found[(batch, "on")]
                print(f"{model:<8}{batch:>6}{off:>12.1f}{on:>11.1f}{on - off:>9.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
