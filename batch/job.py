"""One batch job: read INPUT in chunks, score each chunk, store it, assemble OUTPUT."""

from __future__ import annotations

import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from kiln.batch import writers
from kiln.batch.chunks import BatchError
from kiln.batch.columns import layout_for
from kiln.batch.readers import open_source
from kiln.batch.store import ChunkStore
from kiln.handlers.backends import EXPORT_FILES
from kiln.handlers.signature import load_signature

log = logging.getLogger("kiln.batch")
VIAS = ("local", "server", "ray")


@dataclass
class JobSettings:
    name: str
    input: Path
    output: Path
    artifacts: Path  # the exported model's folder: signature.json and its exports
    via: str = "local"
    backend: str | None = None  # the export --via local and ray run (None: onnx)
    batch_size: int = 256
    concurrency: int = 4
    chunk_size: int = 10_000
    resume: bool = False
    url: str | None = None  # --via server
    token: str | None = None
    timeout: float = 30
    retries: int = 6
    progress: bool = True
    chunk_delay_s: float = 0.0  # for tests that must interrupt a job mid-way


@dataclass
class Summary:
    rows: int
    failed: int
    seconds: float  # this run's
    rows_this_run: int

    @property
    def rows_per_s(self) -> float:
        return self.rows_this_run / self.seconds if self.seconds > 0 else 0.0

    def describe(self) -> str:
        return (f"{self.rows - self.failed} rows scored, {self.failed} failed, "
                f"{self.rows_this_run} this run in {self.seconds:.1f} s "
                f"({self.rows_per_s:,.0f} rows/s)")


def model_path(settings: JobSettings) -> Path:
    """The export a local or Ray job runs."""
    return settings.artifacts / EXPORT_FILES[settings.backend or "onnx"]


def check_form(settings: JobSettings) -> None:
    """Refuses, before anything is read or written, a backend a job would not run."""
    if settings.via == "server":
        if settings.backend is not None:  # ignoring it would score with another form unsaid
            raise BatchError("--backend picks the export of --via local or ray; the server "
                             "runs the form its archive holds (kiln archive --backend)")
        return
    if (settings.backend or "onnx") not in EXPORT_FILES:
        raise BatchError(f"--backend {settings.backend!r}: expected one of "
                         f"{', '.join(EXPORT_FILES)}")
    if not model_path(settings).exists():
        raise BatchError(f"{model_path(settings)} is missing: kiln export {settings.name} "
                         f"writes it (a model that form cannot export has none; its "
                         f"signature's parity says which forms passed)")


def make_scorer(settings: JobSettings, signature):
    if settings.via == "local":
        from kiln.batch.local import LocalScorer

        return LocalScorer(model_path(settings), signature, settings.batch_size)
    if settings.via == "server":
        from kiln.batch.remote import RetryPolicy, ServerScorer

        return ServerScorer(settings.name, signature, settings.url, settings.token,
                            settings.batch_size, settings.concurrency, settings.timeout,
                            RetryPolicy(attempts=settings.retries))
    if settings.via == "ray":
        from kiln.batch.ray_job import RayScorer

        return RayScorer(model_path(settings), signature, settings.batch_size,
                         settings.concurrency)
    raise BatchError(f"--via {settings.via!r}: expected one of {', '.join(VIAS)}")


def _job_identity(settings: JobSettings, columns) -> dict:
    """What must not change between a run and its --resume (chunks would not line up, or
    hold other columns)."""
    return {"name": settings.name, "input": str(settings.input.resolve()),
            "chunk_size": settings.chunk_size, "columns": list(columns)}


def run(settings: JobSettings) -> Summary:
    signature_path = settings.artifacts / "signature.json"
    if not signature_path.exists():
        raise BatchError(f"{signature_path} is missing: run kiln export {settings.name}")
    signature = load_signature(signature_path)
    check_form(settings)
    writers.check_output(settings.output)
    source = open_source(settings.input, signature, settings.chunk_size)
    layout = layout_for(signature["output"])
    store = ChunkStore(settings.output, _job_identity(settings, layout.columns), layout)
    done = store.open(settings.resume)
    start, rows_this_run = time.perf_counter(), 0
    todo = (c for c in source.chunks() if c.index not in done)
    scorer = make_scorer(settings, signature)
    with _progress(source.total, sum(e["rows"] for e in done.values()), settings) as bar:
        try:
            for rows in _stored(scorer.score(todo), store, behind=settings.via == "local"):
                rows_this_run += rows
                bar.update(rows)
                if settings.chunk_delay_s:
                    time.sleep(settings.chunk_delay_s)
        finally:
            scorer.close()
    writers.write_output(settings.output, store)
    summary = Summary(sum(e["rows"] for e in store.done.values()),
                      sum(e["failed"] for e in store.done.values()),
                      time.perf_counter() - start, rows_this_run)
    store.remove()
    log.debug("%s -> %s: %s", settings.input, settings.output, summary.describe())
    return summary


def _stored(scored_chunks, store: ChunkStore, behind: bool = True):
    """Each scored chunk written to the store, in order; yields each chunk's rows once it is
    stored. `behind`: written by a thread of its own, at most one write in flight, so that
    formatting and fsync overlap the next chunk's scoring (a local job, whose chunks come as
    fast as the cores allow; a server job's come at the server's pace). Either way a chunk
    not yet yielded may be lost to a crash, never one that was."""
    if not behind:
        for chunk, scored in scored_chunks:
            store.write_chunk(chunk.index, scored)
            yield len(scored)
        return
    with ThreadPoolExecutor(1, thread_name_prefix="kiln-store") as writer:
        pending = None
        try:
            for chunk, scored in scored_chunks:
                writing = writer.submit(store.write_chunk, chunk.index, scored), len(scored)
                if pending is not None:
                    pending[0].result()
                    yield pending[1]
                pending = writing
            if pending is not None:
                pending[0].result()
                yield pending[1]
                pending = None
        finally:
            if pending is not None:  # the job failed or stopped: finish the write under way
                pending[0].exception()


def _progress(total, initial: int, settings: JobSettings):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="rows", file=sys.stderr,
                disable=not settings.progress, desc=f"{settings.name} via {settings.via}",
                dynamic_ncols=True, smoothing=0.1)

