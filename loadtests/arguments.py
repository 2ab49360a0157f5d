"""`kiln loadtest` flags (kept apart from loadtests/run.py so that building the parser stays
cheap)."""

from __future__ import annotations

import argparse
from pathlib import Path

from kiln.client import TOKEN_HELP
from kiln.declaration import add_models_dir
from kiln.loadtests.shapes import SHAPES
from kiln.workspace import Workspace, add_run_dir


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="declared model (or NAME.toml path) to load")
    add_models_dir(p)
    p.add_argument("--users", type=int, default=10, help="peak concurrent users (default: 10)")
    p.add_argument("--spawn-rate", type=float, default=2.0,
                   help="users started per second (default: 2)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load (default: 60)")
    p.add_argument("--shape", choices=SHAPES, default="constant",
                   help="load shape: constant, step (4 steps up) or spike (default: constant)")
    p.add_argument("--no-oip", action="store_true",
                   help="leave out the Open Inference Protocol user (default: include it)")
    p.add_argument("--thresholds", type=Path,
                   help="YAML/TOML file with max_fail_ratio, max_p95_ms, max_p99_ms; the "
                        "flags below override it (default: none)")
    p.add_argument("--max-fail-ratio", type=float,
                   help="fail when more than this share of requests failed (default: 0.01)")
    p.add_argument("--max-p95-ms", type=float, help="fail above this p95 (default: no limit)")
    p.add_argument("--max-p99-ms", type=float, help="fail above this p99 (default: no limit)")
    p.add_argument("--start-server", action="store_true",
                   help="start a TorchServe of NAME on free ports and stop it after "
                        "(default: use the one kiln serve started)")
    p.add_argument("--url", help="inference base URL (default: from run/ports.json)")
    p.add_argument("--oip-url", help="OIP base URL (default: from run/ports.json)")
    p.add_argument("--metrics-url", help="metrics base URL (default: from run/ports.json)")
    p.add_argument("--token", help=TOKEN_HELP)
    add_run_dir(p, "where kiln serve keeps ports, tokens and its pid")
    p.add_argument("--store", type=Path, default=Workspace.current().model_store,
                   help="model store for --start-server (default: the workspace's "
                        "model_store/)")
    p.add_argument("--out", type=Path,
                   help="folder for the CSVs and report.html "
                        "(default: run/loadtests/NAME-YYYYmmdd-HHMMSS)")
    p.add_argument("--scrape-interval", type=float, default=2.0,
                   help="seconds between metrics scrapes (CPU: twice as often) (default: 2)")
