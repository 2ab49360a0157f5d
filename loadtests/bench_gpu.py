"""The GPU section of `kiln bench`: ONNX Runtime's CUDA execution provider and TorchScript on
cuda:0, at batch 1 and at the served batch, in this process (bench.py serves them too). Where
torch sees no CUDA the section says that it was skipped, in so many words."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kiln.loadtests import inprocess
from kiln.loadtests.bench_table import Row, format_table

DEVICE = "cuda:0"
SKIPPED = "GPU section skipped: no CUDA here (torch.cuda.is_available() is False)"
NO_ORT_CUDA = ("ONNX Runtime rows skipped: onnxruntime has no CUDAExecutionProvider "
               "(install onnxruntime-gpu)")


@dataclass
class Section:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    ran: bool = False


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def callers(artifacts: Path) -> tuple[dict, list[str]]:
    """Backend name -> function of a host batch (copied to the GPU and back, as a server's
    would be), and notes on what is missing."""
    import onnxruntime as ort
    import torch

    out, notes = {}, []
    if "CUDAExecutionProvider" in ort.get_available_providers():
        session = ort.InferenceSession(str(artifacts / "model.onnx"),
                                       providers=["CUDAExecutionProvider"])
        name = session.get_inputs()[0].name
        out[f"onnxruntime {DEVICE}"] = lambda b: session.run(None, {name: b})
    else:
        notes.append(NO_ORT_CUDA)
    module = torch.jit.load(str(artifacts / "model.ts"), map_location=DEVICE).eval()

    def torchscript(batch):
        with torch.inference_mode():
            return module(torch.from_numpy(batch).to(DEVICE)).cpu()

    out[f"torchscript {DEVICE}"] = torchscript
    return out, notes


def inprocess_rows(artifacts: Path, body: bytes, batches: list[int], seconds: float,
                   cuda: bool | None = None) -> Section:
    """In-process rows on the GPU; an empty section with SKIPPED where there is no CUDA."""
    if not (cuda_available() if cuda is None else cuda):
        return Section(notes=[SKIPPED])
    x = inprocess.model_input(artifacts, body)
    fns, notes = callers(artifacts)
    rows = []
    for backend, fn in fns.items():
        for batch in batches:
            xb = np.ascontiguousarray(np.repeat(x, batch, axis=0))
            calls, rate, p50, p99 = inprocess.time_calls(lambda b=xb, f=fn: f(b), batch,
                                                         seconds)
            rows.append(Row(f"in-process {backend} b{batch}", 0, rate, p50, p99, calls))
    return Section(rows, notes, ran=True)


def lines(section: Section) -> list[str]:
    if not section.ran:
        return section.notes
    return [f"GPU ({DEVICE}):", format_table(section.rows), *section.notes]
