"""What a user writes instead of `kiln batch`: a torch DataLoader over the same files, the
same ONNX model in onnxruntime, labels to a CSV. batch_bench times Kiln's --via local
against it: `python -m kiln.loadtests.studies.dataloader_baseline ARTIFACTS INPUT OUTPUT`."""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset


class PngFolder(Dataset):
    def __init__(self, folder: Path, spec: dict):
        self.paths = sorted(folder.rglob("*.png"))
        self.pad, self.mean, self.std = spec["pad"], spec["mean"][0], spec["std"][0]

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        pixels = np.asarray(Image.open(self.paths[i]).convert("L"), dtype=np.float32) / 255
        pixels = np.pad(pixels, self.pad)
        return torch.from_numpy((pixels[None] - self.mean) / self.std)


class CsvRows(Dataset):
    def __init__(self, path: Path, spec: dict):
        table = pd.read_csv(path)[spec["names"]].to_numpy(dtype=np.float32)
        self.rows = (table - np.float32(spec["mean"])) / np.float32(spec["std"])

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return torch.from_numpy(self.rows[i])


def run(artifacts: Path, inp: Path, out: Path, batch_size: int = 256, workers: int = 2,
        intra_op_threads: int | None = None) -> float:
    """Scores INPUT into OUT; rows/s, reading the files included. `intra_op_threads`: None
    leaves ONNX Runtime's default (a thread per core, spinning), as a straightforward script
    does."""
    start = time.perf_counter()
    signature = json.loads((artifacts / "signature.json").read_text())
    spec, labels = signature["inputs"][0], signature["output"]["labels"]
    data = PngFolder(inp, spec) if inp.is_dir() else CsvRows(inp, spec)
    options = ort.SessionOptions()
    if intra_op_threads:
        options.intra_op_num_threads = intra_op_threads
    session = ort.InferenceSession(str(artifacts / "model.onnx"), options,
                                   providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    with open(out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["label", "probability"])
        for batch in DataLoader(data, batch_size=batch_size, num_workers=workers):
            probabilities = session.run(None, {name: batch.numpy()})[0]
            if probabilities.shape[1] == 1:  # binary: the probability of labels[1]
                probabilities = np.hstack([1 - probabilities, probabilities])
            best = probabilities.argmax(axis=1)
            writer.writerows(zip([labels[k] for k in best],
                                 probabilities[np.arange(len(best)), best].tolist(), strict=True))
    return len(data) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", type=Path, help="exported model folder")
    parser.add_argument("input", type=Path, help="a folder of PNGs or a CSV with a header")
    parser.add_argument("output", type=Path, help="labels CSV")
    parser.add_argument("--batch-size", type=int, default=256, help="(default: 256)")
    parser.add_argument("--workers", type=int, default=2, help="(default: 2)")
    parser.add_argument("--intra-op-threads", type=int,
                        help="ONNX Runtime's intra-op threads (default: its own, one per core)")
    args = parser.parse_args(argv)
    rate = run(args.artifacts, args.input, args.output, args.batch_size, args.workers,
               args.intra_op_threads)
    print(f"{rate:,.0f} rows/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
