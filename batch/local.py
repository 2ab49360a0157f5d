"""--via local: the exported model in this process (ONNX Runtime or TorchScript), while the next
chunks are read in a thread and their parts decoded elsewhere: images (a folder, or a table's
image column) in worker processes (PNG/JPEG decoding and MNIST framing are Python and numpy
per image, so threads would queue on the GIL), other table rows in threads (raw values are
decoded with vectorised numpy, which releases the GIL; instances are small JSON values)."""

from __future__ import annotations

import functools
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from itertools import chain
from pathlib import Path

from kiln.batch import scoring
from kiln.batch.chunks import Chunk, Scored
from kiln.batch.pipeline import prefetched, score_chunks
from kiln.handlers import backends
from kiln.handlers.cores import usable_cores
from kiln.handlers.signature import input_names

PARENT_POLL_S = 0.5
READ_AHEAD = 2  # chunks read and parsed ahead of the one being scored
# Raw table values are decoded with vectorised numpy: a part of a few thousand rows costs
# little more than one of batch_size, so they go to the pool in parts of about this many
# values (8 MB of float64), not of batch_size rows.
VALUES_PER_PART = 1 << 20


class LocalScorer:
    def __init__(self, model_path: Path, signature, batch_size: int,
                 workers: int | None = None, intra_op_threads: int | None = None):
        cores = usable_cores()  # affinity and cgroup quota, not the host's count
        self.signature = signature
        self.batch_size = batch_size
        self.workers = workers or cores
        self.model_path = model_path
        self.intra_op_threads = intra_op_threads or cores

    @functools.cached_property
    def backend(self):
        """The ONNX Runtime session or TorchScript module, made at first use: after the
        decoding workers are forked, so that they start with none of its threads."""
        return backends.load_backend(str(self.model_path),
                                     intra_op_threads=self.intra_op_threads,
                                     input_names=input_names(self.signature))

    def score(self, chunks: Iterable[Chunk]) -> Iterator[tuple[Chunk, Scored]]:
        def finish(part: Chunk, decoded: scoring.Decoded) -> Scored:
            return scoring.score(self.backend, part, decoded, self.batch_size, self.signature)

        return self.pipeline(chunks, finish)

    def pipeline(self, chunks: Iterable[Chunk], finish: Callable) -> Iterator[tuple[Chunk,
                                                                                   Scored]]:
        """Chunks read ahead in a thread, their parts (batch_size inputs; more of raw
        values) decoded in the pool, then finish(part, decoded) -> Scored in this thread, in
        order (the benchmark times decoding alone with a finish that does nothing)."""
        chunks = iter(chunks)
        first = next(chunks, None)
        if first is None:
            return
        with self._pool(images=scoring.decodes_images(first, self.signature)) as pool:
            # partial of a module-level function: picklable for worker processes
            decode = functools.partial(scoring.decode_chunk, signature=self.signature)
            ahead = prefetched(chain([first], chunks), READ_AHEAD)
            try:
                yield from score_chunks(ahead, self._part_size(first), pool, decode, finish,
                                        ahead=2 * self.workers + 1)
            finally:
                ahead.close()

    def _part_size(self, first: Chunk) -> int:
        """Inputs per part sent to the pool (the model still takes batch_size a call)."""
        if first.values is None or not len(first):
            return self.batch_size
        return max(self.batch_size, VALUES_PER_PART // max(1, first.values[0].size))

    def _pool(self, images: bool) -> Executor:
        if images:
            # fork, not spawn: a spawned worker imports numpy, PIL and the job's __main__
            # afresh (seconds of a short job on a small machine). Forked before the job starts
            # its reading thread or its ONNX Runtime session (see backend): no thread of its
            # own can hold a lock that the workers inherit.
            pool = ProcessPoolExecutor(self.workers,
                                       mp_context=multiprocessing.get_context("fork"),
                                       initializer=exit_with_parent, initargs=(os.getpid(),))
            pool.submit(int).result()  # forks every worker now
            return pool
        return ThreadPoolExecutor(self.workers, thread_name_prefix="kiln-decode")

    def close(self) -> None:
        pass


def exit_with_parent(parent: int) -> None:
    """Worker initializer: a job killed outright (SIGKILL gives it no chance to stop its
    pool) must not leave its decoding workers behind."""

    def watch():
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="kiln-parent-watch", daemon=True).start()
