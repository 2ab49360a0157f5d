"""What Kiln's worker site hook saves, and where the front proxy's cost goes, by process:

    python -m kiln.loadtests.studies.worker_io [--clients 16,32] [--rounds 4] [--seconds 5]

Four servers of lenet, all up, taking turns (the order reversed every other round), wrk at
each --clients, medians of the rounds:
- kiln front: Kiln as `kiln serve lenet` runs it (its serving defaults here), through nginx;
- kiln front, no site: the same without deploy/worker_site (TorchServe's own frame reading,
  torch imported at start);
- kiln direct: the first server, straight to TorchServe's port;
- plain best: loadtests/plain_handler.py at bench.PLAIN_BEST_CONFIG on TorchServe as released
  (kiln bench's "plain best").
Printed per cell (studies/front_floor.py's table): inputs/s, its ratio to plain best, p50,
wrk's CPU, and CPU microseconds a request of the workers, of TorchServe's frontend (its JVM)
and of nginx.

Quiet machine, lenet at w2 b8 d1, 3 rounds of 5 s (medians; inputs/s, then CPU us a request of
the workers, the JVM and nginx):

| row | 16 clients | 32 clients |
|---|---|---|
| kiln front | 3,829 (228, 114, 54) | 5,391 (201, 80, 48) |
| kiln front, no site | 3,531 (274, 148, 54) | 4,665 (245, 98, 49) |
| kiln direct | 4,920 (211, 103) | 6,618 (191, 74) |
| plain best | 5,069 (201, 122) | 6,218 (208, 79) |

Kiln's handler without TorchServe's PredictionTime line (handler.skip_prediction_time; a
scratch toggle, 32 clients, 4 rounds): 5,316 against 4,803 inputs/s with it, workers 203
against 219 and JVM 88 against 105 us a request.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

from kiln.console import setup_logging
from kiln.deploy.server import Ports, Server
from kiln.loadtests import bench
from kiln.loadtests.bench_table import DIRECT, FRONT
from kiln.loadtests.studies.front_floor import MODEL, arguments, kiln_and_plain, table, take_turns
from kiln.model_store.build import ensure_built


def cells(root: Path) -> list[tuple[Server, bench.Target]]:
    kiln, plain, plain_name, target = kiln_and_plain(root)
    no_site = Server(dataclasses.replace(kiln.settings, run_dir=root / "no-site",
                                         ports=Ports.free(), internal_ports=Ports.free(),
                                         worker_site=False))
    return [(kiln, target("kiln front", FRONT, MODEL)),
            (no_site, target("kiln front, no site", FRONT, MODEL)),
            (kiln, target("kiln direct", DIRECT, MODEL)),
            (plain, target("plain best", DIRECT, plain_name))]


def main(argv: list[str] | None = None) -> int:
    opts = arguments(__doc__, argv)
    setup_logging()
    ensure_built(MODEL)
    with tempfile.TemporaryDirectory(prefix="kiln-worker-io-") as root:
        runs = take_turns(Path(root), cells(Path(root)), opts)
    print("\n".join(table(runs)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
