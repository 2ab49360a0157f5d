"""`kiln batch` flags. Only argparse and the export forms' names here: building the parser
must stay cheap."""

from __future__ import annotations

import argparse
from pathlib import Path

from kiln.client import TOKEN_HELP
from kiln.handlers.backends import EXPORT_FILES
from kiln.workspace import add_run_dir

VIAS = ("local", "server", "ray")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="declared model (or NAME.toml path) to run: its export in "
                   "artifacts/NAME")
    p.add_argument("input", type=Path, help="a folder of PNG/JPEG images (recursive), or a "
                   ".npy, .csv, .jsonl or .parquet file: feature columns or H*W pixel columns "
                   "for a model of one features or image input, else one column per input "
                   "named after it (a tensor's cell a JSON array, an image's a path or base64)")
    p.add_argument("output", type=Path, help="results: .csv, .jsonl or .parquet, one row per "
                   "input: id, the answer's columns (label and probability; labels and "
                   "probabilities; one per regression output; or output), error")
    p.add_argument("--via", choices=VIAS, default="local",
                   help="in this process (ONNX Runtime or TorchScript, see --backend), the running "
                        "TorchServe, or Ray (default: local)")
    p.add_argument("--backend", choices=list(EXPORT_FILES),
                   help="the export --via local or ray runs, as kiln archive names them "
                        "(default: onnx; the server runs its archive's)")
    p.add_argument("--batch-size", type=int, default=256,
                   help="inputs per model call or per request (default: 256)")
    p.add_argument("--concurrency", type=int, default=4,
                   help="requests in flight (server) or actors (ray) (default: 4)")
    p.add_argument("--chunk-size", type=int, default=10_000,
                   help="inputs per stored chunk, the unit of --resume (default: 10000)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from its finished chunks (default: off)")
    p.add_argument("--allow-failures", action="store_true",
                   help="exit 0 even if some inputs could not be scored (default: exit 1)")
    p.add_argument("--artifacts", type=Path, help="exported model folder (default: the "
                   "workspace's artifacts/NAME)")
    p.add_argument("--url", help="inference base URL for --via server (default: from "
                   "run/ports.json)")
    p.add_argument("--token", help=TOKEN_HELP)
    add_run_dir(p, "where kiln serve keeps its ports and tokens")
    p.add_argument("--timeout", type=float, default=30,
                   help="seconds per request (default: 30)")
    p.add_argument("--retries", type=int, default=6,
                   help="tries per request on 502/503/504, timeouts and connection errors, "
                        "with exponential backoff (default: 6)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    # Tests interrupt a job mid-way; a pause after each chunk gives them time to.
    p.add_argument("--chunk-delay", type=float, default=0.0, help=argparse.SUPPRESS)
