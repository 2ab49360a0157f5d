"""What decoding a request costs next to the model call:
`python -m kiln.loadtests.studies.decode_cost`.

Times Kiln's request decoding on one image model's input (its first declared example) sent
as a JSON array of floats, a JSON array of integers, a PNG, and a .npy array (alone and eight
to a body), against one ONNX Runtime call on the decoded input, in one run. Figures are
medians per input.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

from kiln.handlers import rest
from kiln.handlers.signature import load_signature
from kiln.loadtests import declared, payloads
from kiln.workspace import Workspace


def median_seconds(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bodies(pixels: np.ndarray) -> dict[str, tuple[bytes, int]]:
    """Format name -> (body, inputs in it)."""
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, format="PNG")
    one, eight = io.BytesIO(), io.BytesIO()
    np.save(one, pixels)
    np.save(eight, np.stack([pixels] * 8))
    floats = (pixels * 0.999987).round(6)  # non-integer values, as a client holding floats sends
    return {
        "JSON floats": (json.dumps(floats.tolist()).encode(), 1),
        "JSON integers": (json.dumps(pixels.tolist()).encode(), 1),
        "PNG": (png.getvalue(), 1),
        ".npy x1": (one.getvalue(), 1),
        ".npy x8": (eight.getvalue(), 8),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    declared.add_model_argument(parser, "image")
    parser.add_argument("--artifacts", type=Path,
                        help="the model's export (default: the workspace's artifacts/MODEL)")
    parser.add_argument("--repeat", type=int, default=300, help="timings each (default: 300)")
    args = parser.parse_args(argv)
    decl = declared.chosen(parser, args, "image")
    if declared.input_kind(decl) != "image":
        parser.error(f"{decl.name} does not take one image")
    artifacts = args.artifacts or Workspace.current().exports(decl.name)
    signature = load_signature(artifacts / "signature.json")
    session = ort.InferenceSession(str(artifacts / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    spec = decl.inputs[0]
    pixels = payloads.raw_values(payloads.examples(decl)[0], spec).astype(np.uint8)
    x = rest.decode_request(pixels.tolist(), signature)[np.newaxis]
    infer = median_seconds(lambda: session.run(None, {spec["name"]: x}), args.repeat)
    print(f"{'body':<15}{'bytes':>8}{'decode us/input':>17}{'x ONNX call':>13}")
    for name, (body, n) in bodies(pixels).items():
        t = median_seconds(lambda b=body: rest.decode_body(b, signature),
                           args.repeat) / n
        print(f"{name:<15}{len(body):>8}{t * 1e6:>17.1f}{t / infer:>13.2f}")
    print(f"{'ONNX call':<15}{'':>8}{infer * 1e6:>17.1f}{1:>13.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
