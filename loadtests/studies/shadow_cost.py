"""What a shadow costs the clients (issue 18): wrk on unpinned /predictions/lenet at 16
keep-alive connections, routed to 1.0, with lenet 2.0 shadowing none, a fifth, or all of the
requests, in turn, `--rounds` times each. A sampled REST request is mirrored by nginx to the
OIP plugin (deploy/nginx/nginx.conf), which answers at once and scores 1.0 and 2.0 again in
the background; nginx holds the next request on that connection until the mirror's answer.
2.0 here is 1.0's archive under another version: the cost is the same, the answers agree.

    python -m kiln.loadtests.studies.shadow_cost [--seconds 10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import zipfile
from pathlib import Path

import requests

from kiln.deploy import routing
from kiln.deploy.server import Ports, Server, ServerSettings
from kiln.loadtests.studies.route_cost import run
from kiln.model_store.build import ensure_built

MODEL = "lenet"
FRACTIONS = (0.0, 0.2, 1.0)


def second_version(source: Path, store: Path) -> Path:
    """`source` again as version 2.0 (its manifest's modelVersion), NAME-2.0.mar."""
    out = store / f"{MODEL}-2.0.mar"
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zout:
        for item in zin.infolist():
            data = zin.read(item)
            if item.filename == "MAR-INF/MANIFEST.json":
                manifest = json.loads(data)
                manifest["model"]["modelVersion"] = "2.0"
                data = json.dumps(manifest).encode()
            zout.writestr(item, data)
    return out


def register(server: Server, archive: Path) -> None:
    r = requests.post(f"{server.url('management')}/models", timeout=180,
                      params={"url": archive.name, "initial_workers": 1, "synchronous": "true"},
                      headers={"Authorization": f"Bearer {server.keys()['management']}"})
    r.raise_for_status()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=10, help="each run (default 10)")
    p.add_argument("--rounds", type=int, default=3, help="runs of each fraction (default 3)")
    opts = p.parse_args(argv)
    archive = ensure_built(MODEL)
    results = {f: [] for f in FRACTIONS}
    with tempfile.TemporaryDirectory(prefix="kiln-shadow-cost-") as folder:
        store = Path(folder) / "store"
        store.mkdir()
        (store / f"{MODEL}.mar").write_bytes(Path(archive).read_bytes())
        server = Server(ServerSettings(Path(folder) / "run", store, [MODEL], Ports.free(),
                                       internal_ports=Ports.free(), enable_model_api=True,
                                       cores=2))
        with server.running(timeout=240):
            register(server, second_version(store / f"{MODEL}.mar", store))
            state = routing.state_file(server.run_dir)
            for _ in range(opts.rounds):
                for fraction in FRACTIONS:
                    shadows = {"2.0": fraction} if fraction else {}
                    state.write_text(json.dumps({MODEL: {"default": "1.0", "route": None,
                                                         "shadows": shadows}}))
                    results[fraction].append(run(server, f"/predictions/{MODEL}", opts.seconds))
                    print(fraction, "req/s, p50 ms, p99 ms, failed:", results[fraction][-1],
                          flush=True)
    for fraction, runs in results.items():
        print(f"shadow {fraction:g}: median {statistics.median(r[0] for r in runs):.0f} req/s, "
              f"p50 {statistics.median(r[1] for r in runs):.2f} ms, "
              f"p99 {statistics.median(r[2] for r in runs):.2f} ms, "
              f"failed {sum(r[3] for r in runs)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
