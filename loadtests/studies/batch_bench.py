"""`kiln batch` throughput: `python -m kiln.loadtests.studies.batch_bench`.

In one run, for the first image model of Kiln's default set on 10,000 PNG images (its recipe's
images and a copy shifted by one pixel) and for the first features model on 100,000 CSV rows
(its recipe's rows resampled), prints rows/s of:

- the raw ONNX Runtime ceiling: --via local's session on the already decoded arrays;
- reading and decoding alone: --via local's pool and parts, with no model;
- --via local, whole jobs (read, decode, score, store chunks, write OUTPUT as CSV);
- --via server, against a TorchServe started for the purpose on free ports;
- the DataLoader baseline: what a user writes instead (loadtests/studies/dataloader_baseline.py, a
  torch DataLoader with 2 workers and the same ONNX model in onnxruntime);

and the ratios local/ceiling, local/bound, local/baseline and server/local; each figure is
the best of --repeat runs, all of them taking turns within each repeat (a shared machine's
busy spells then hit every figure alike). The bound is what a pipeline of
the two stages can reach when both share the same cores: 1 / (1/ceiling + 1/decoding). Where
decoding a row costs more CPU than scoring it (a PNG or a CSV line against one of Kiln's small
models), the bound, not the ceiling, is the most a machine of this many cores can give.

That bound leaves out the output. Where a row costs about a microsecond to read and decode
(a CSV line), writing its answer (chunk file, manifest, OUTPUT) is no longer small next to
it: "writing" times that stage alone on the job's own answers, and bound3 is the three-stage
bound 1 / (1/ceiling + 1/decoding + 1/writing).
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from kiln import declaration
from kiln.batch import job, scoring, writers
from kiln.batch.chunks import Scored
from kiln.batch.columns import layout_for
from kiln.batch.local import LocalScorer
from kiln.batch.readers import open_source
from kiln.batch.store import ChunkStore
from kiln.declaration import Declaration, DeclarationError
from kiln.handlers.signature import load_signature
from kiln.loadtests import declared
from kiln.workspace import Workspace

log = logging.getLogger("kiln.bench")


def recipe_data(decl: Declaration) -> tuple:
    """(x, y, labels, feature names) of the data the model's recipe trains on."""
    from kiln.training import recipes
    from kiln.training.data import load_raw

    if decl.recipe is None:
        raise DeclarationError(f"{decl.path}: no [weights] recipe, so no data to time it on")
    return load_raw(recipes.RECIPE_DATASET[decl.recipe])


def make_images(decl: Declaration, folder: Path, n: int) -> Path:
    x = recipe_data(decl)[0]
    shifted = np.roll(x, 1, axis=2)
    images = np.concatenate([x, shifted] * (n // (2 * len(x)) + 1))[:n]
    for i, pixels in enumerate(images):
        sub = folder / f"{i // 1000:02d}"
        sub.mkdir(exist_ok=True)
        Image.fromarray(pixels).save(sub / f"{i:05d}.png")
    return folder


def make_rows(decl: Declaration, path: Path, n: int) -> Path:
    x, _, _, names = recipe_data(decl)
    rows = x[np.random.default_rng(0).integers(0, len(x), n)]
    np.savetxt(path, rows, delimiter=",", header=",".join(names), comments="", fmt="%.6g")
    return path


def ceiling(name: str, inp: Path, batch_size: int) -> float:
    """rows/s of ONNX Runtime alone on the decoded inputs, with --via local's session."""
    artifacts = Workspace.current().exports(name)
    signature = load_signature(artifacts / "signature.json")
    scorer = LocalScorer(artifacts / "model.onnx", signature, batch_size)
    parts = [part for c in open_source(inp, signature, 10_000).chunks()
             for part in scoring.decode_chunk(c, signature).parts]
    batches = list(scoring.model_batches(parts, batch_size, signature))
    scorer.backend.run(batches[0])  # warm up
    start = time.perf_counter()
    for batch in batches:
        scorer.backend.run(batch)
    return sum(len(b[0]) for b in batches) / (time.perf_counter() - start)


def decode_alone(name: str, inp: Path, batch_size: int) -> float:
    """rows/s of reading and decoding the inputs with --via local's pool, no model."""
    artifacts = Workspace.current().exports(name)
    signature = load_signature(artifacts / "signature.json")
    scorer = LocalScorer(artifacts / "model.onnx", signature, batch_size)
    source = open_source(inp, signature, job.JobSettings.chunk_size)
    start = time.perf_counter()
    rows = sum(len(chunk) for chunk, _ in scorer.pipeline(
        source.chunks(), lambda part, decoded: Scored([], [], [], [])))
    return rows / (time.perf_counter() - start)


def writing_alone(name: str, inp: Path, out: Path, batch_size: int) -> float:
    """rows/s of storing already scored chunks and writing OUTPUT as CSV, as --via local
    does after scoring (chunk files, manifest, the final file), with no reading or model."""
    artifacts = Workspace.current().exports(name)
    signature = load_signature(artifacts / "signature.json")
    scorer = LocalScorer(artifacts / "model.onnx", signature, batch_size)
    source = open_source(inp, signature, job.JobSettings.chunk_size)
    scored = [(chunk.index, rows) for chunk, rows in scorer.score(source.chunks())]
    layout = layout_for(signature["output"])
    start = time.perf_counter()
    chunk_store = ChunkStore(out, {"name": name}, layout)
    chunk_store.open(resume=False)
    for index, rows in scored:
        chunk_store.write_chunk(index, rows)
    writers.write_output(out, chunk_store)
    chunk_store.remove()
    return sum(len(rows) for _, rows in scored) / (time.perf_counter() - start)


def via(name: str, inp: Path, out: Path, how: str, args, server=None) -> float:
    extra = {}
    if server is not None:
        extra = dict(url=server.url("inference"), token=server.keys()["inference"])
    settings = job.JobSettings(name=name, input=inp, output=out, via=how, progress=False,
                               artifacts=Workspace.current().exports(name),
                               batch_size=args.batch_size, concurrency=args.concurrency, **extra)
    return job.run(settings).rows_per_s


def baseline(name: str, inp: Path, out: Path, args) -> float:
    # Imported here: it imports torch, which nothing else here needs (nor any process that
    # re-imports this module as its __main__).
    from kiln.loadtests.studies import dataloader_baseline

    return dataloader_baseline.run(Workspace.current().exports(name), inp, out, args.batch_size,
                                   args.workers, args.baseline_threads)


def measures_for(name: str, inp: Path, tmp: Path, args, server) -> dict:
    """What the table times for one model, by column."""
    measures = {
        "ceiling": lambda: ceiling(name, inp, args.batch_size),
        "decoding": lambda: decode_alone(name, inp, args.batch_size),
        "writing": lambda: writing_alone(name, inp, tmp / f"{name}-writing.csv",
                                         args.batch_size),
        "local": lambda: via(name, inp, tmp / f"{name}-local.csv", "local", args),
        "baseline": lambda: baseline(name, inp, tmp / f"{name}-baseline.csv", args),
    }
    if server is not None:
        measures["server"] = lambda: via(name, inp, tmp / f"{name}-server.csv", "server", args,
                                         server)
    return measures


def taking_turns(repeat: int, measures: dict) -> dict[str, float]:
    """The best of `repeat` runs of each measure, the measures taking turns within each
    repeat: a shared machine's busy spells then hit every figure, not one."""
    runs = [{name: measure() for name, measure in measures.items()} for _ in range(repeat)]
    return {name: max(run[name] for run in runs) for name in measures}


def start_server(folder: Path, models: list[str]):
    from kiln.deploy.server import Ports, Server, ServerSettings

    srv = Server(ServerSettings(run_dir=folder, model_store=Workspace.current().model_store,
                                models=models, ports=Ports.free()))
    srv.start()
    srv.wait_ready(timeout=240)
    return srv


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000, help="(default: 10000)")
    parser.add_argument("--rows", type=int, default=100_000, help="(default: 100000)")
    parser.add_argument("--batch-size", type=int, default=256, help="(default: 256)")
    parser.add_argument("--concurrency", type=int, default=4, help="(default: 4)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of each measurement, the best one counts (default: 3)")
    parser.add_argument("--no-server", action="store_true", help="skip --via server")
    parser.add_argument("--workers", type=int, default=2,
                        help="the baseline DataLoader's num_workers (default: 2)")
    parser.add_argument("--baseline-threads", type=int,
                        help="the baseline's ONNX Runtime intra-op threads (default: ONNX "
                             "Runtime's own, as a straightforward script leaves it)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    image, table = (declaration.get(declared.default_name(kind)) for kind in ("image", "features"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "images").mkdir()
        inputs = {image.name: make_images(image, tmp / "images", args.images),
                  table.name: make_rows(table, tmp / "rows.csv", args.rows)}
        counts = {image.name: args.images, table.name: args.rows}
        server = None if args.no_server else start_server(tmp / "server", list(inputs))
        try:
            print(f"rows/s on {os.cpu_count()} cores, batch size {args.batch_size}")
            print(f"{'model':<8}{'rows':>8}{'ORT ceiling':>13}{'decoding':>10}{'bound':>11}"
                  f"{'local':>10}{'local/ceil':>12}{'local/bound':>13}{'baseline':>10}"
                  f"{'local/base':>12}{'server':>9}{'server/local':>14}{'writing':>10}"
                  f"{'bound3':>9}{'local/bound3':>14}")
            for name, inp in inputs.items():
                measures = measures_for(name, inp, tmp, args, server)
                got = taking_turns(args.repeat, measures)
                top, decoding, local, base, writing = (
                    got[k] for k in ("ceiling", "decoding", "local", "baseline", "writing"))
                bound = 1 / (1 / top + 1 / decoding)
                bound3 = 1 / (1 / top + 1 / decoding + 1 / writing)
                remote = got.get("server", float("nan"))
                print(f"{name:<8}{counts[name]:>8}{top:>13,.0f}{decoding:>10,.0f}{bound:>11,.0f}"
                      f"{local:>10,.0f}{local / top:>12.1%}{local / bound:>13.0%}"
                      f"{base:>10,.0f}{local / base:>11.1f}x"
                      f"{remote:>9,.0f}{remote / local:>14.0%}"
                      f"{writing:>10,.0f}{bound3:>9,.0f}{local / bound3:>14.0%}")
        finally:
            if server is not None:
                server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
