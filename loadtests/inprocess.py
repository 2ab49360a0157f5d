"""The model alone, in this process: ONNX Runtime and TorchScript calls on an already
decoded input, at batch 1 and at the archive's batch size. No HTTP, no decoding: the
ceiling a server can approach."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kiln.handlers import rest
from kiln.handlers.signature import load_signature


@dataclass
class Timing:
    backend: str
    batch: int
    calls: int
    throughput: float  # inputs per second
    p50_ms: float
    p99_ms: float


def model_input(artifacts: Path, body: bytes):
    """float32 [1, ...]: the graph's input for one request body, as Kiln's handler makes it."""
    signature = load_signature(artifacts / "signature.json")
    (rows,), _ = rest.decode_body(body, signature)
    return rows


def time_calls(call, batch: int, seconds: float) -> tuple[int, float, float, float]:
    """(calls, inputs/s, p50 ms, p99 ms) of `call` repeated for `seconds` after a warm-up."""
    for _ in range(5):
        call()
    latencies = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - t)
    wall = time.perf_counter() - start
    ms = np.asarray(latencies) * 1e3
    return (len(ms), len(ms) * batch / wall, float(np.percentile(ms, 50)),
            float(np.percentile(ms, 99)))


def callers(artifacts: Path) -> dict:
    """Backend name -> function of a batch."""
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(artifacts / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    module = torch.jit.load(str(artifacts / "model.ts"), map_location="cpu").eval()

    def torchscript(batch):
        with torch.inference_mode():
            return module(batch)

    return {"onnxruntime": lambda b: session.run(None, {input_name: b}),
            "torchscript": lambda b: torchscript(torch.from_numpy(b))}


def measure(artifacts: Path, body: bytes, batches: list[int], seconds: float) -> list[Timing]:
    x = model_input(artifacts, body)
    out = []
    for backend, fn in callers(artifacts).items():
        for batch in batches:
            xb = np.ascontiguousarray(np.repeat(x, batch, axis=0))
            calls, rate, p50, p99 = time_calls(lambda b=xb, f=fn: f(b), batch, seconds)
            out.append(Timing(backend, batch, calls, rate, p50, p99))
    return out
