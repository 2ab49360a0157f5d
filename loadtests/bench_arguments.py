"""Flags of `kiln bench` and `kiln tune`, kept free of heavy imports so that building the
CLI parser stays fast; the commands import loadtests.bench and loadtests.tune when they run."""

from __future__ import annotations

import argparse
from pathlib import Path

from kiln.declaration import add_models_dir
from kiln.workspace import Workspace

# `kiln tune`'s fixed grid and load: the same for every model and every run, so that two
# reports compare. batch_size:max_batch_delay_ms pairs; 1:0 (unbatched) is always measured.
TUNE_CONFIGS = "1:0,4:1,8:2,16:5"
TUNE_WORKERS = "1,2"
TUNE_CLIENTS = 16
# `kiln bench`'s loads besides one client: where Kiln as served must hold against the plain
# handler (issue 21).
BENCH_CLIENTS = [16, 32]


def client_counts(text: str) -> list[int]:
    """"16,32" -> [16, 32]: whole numbers >= 1, for argparse."""
    try:
        counts = sorted({int(n) for n in text.split(",")})
    except ValueError:
        counts = []
    if not counts or counts[0] < 1:
        raise argparse.ArgumentTypeError(f"want whole numbers >= 1 separated by commas, got "
                                         f"{text!r}")
    return counts


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="declared model (or NAME.toml path) to measure")
    add_models_dir(parser)
    parser.add_argument("--clients", type=client_counts, default=BENCH_CLIENTS,
                        help="concurrent connections of the high-load runs, a comma-separated "
                             "list; every row is also measured at 1 (default: "
                             f"{','.join(map(str, BENCH_CLIENTS))})")
    parser.add_argument("--seconds", type=int, default=5,
                        help="measured seconds per served cell, whole seconds (default: 5)")
    parser.add_argument("--out", type=Path, help="also write the rows as JSON here")


def add_tune_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="declared model (or NAME.toml path) to tune")
    add_models_dir(parser)
    parser.add_argument("--p99-ms", type=float, required=True,
                        help="p99 bound in ms, at load and at one client")
    parser.add_argument("--configs", default=TUNE_CONFIGS,
                        help="batch_size:max_batch_delay_ms list; 1:0 is always added "
                             f"(default: the fixed grid, {TUNE_CONFIGS})")
    parser.add_argument("--workers", default=TUNE_WORKERS,
                        help=f"worker counts (default: the fixed grid's, {TUNE_WORKERS})")
    parser.add_argument("--backends", default="onnx,torchscript",
                        help="backends, onnx and/or torchscript (default: onnx,torchscript)")
    parser.add_argument("--clients", type=int, default=TUNE_CLIENTS,
                        help=f"connections of the runs at load (default: {TUNE_CLIENTS})")
    parser.add_argument("--seconds", type=int, default=3,
                        help="seconds per run, whole seconds (default: 3)")
    parser.add_argument("--out", type=Path, default=Workspace.current().tune,
                        help="folder for serving.toml (the pick as a [serving] table), "
                             "report.md and trials.yaml (default: the workspace's tune/)")
    parser.add_argument("--write-declaration", action="store_true",
                        help="also write the pick into the model's declaration, rewriting its "
                             "[serving] table and nothing else (default: off; the pick "
                             "depends on the machine it was measured on)")
