"""--via local: the exported ONNX model in this process, with ONNX Runtime, while the next
parts are read and decoded elsewhere: images (a folder, or a table's image column) in worker
processes (PNG/JPEG decoding and MNIST framing are Python and numpy per image, so threads
would queue on the GIL), other table rows in threads (raw values are decoded with vectorised
numpy, which releases the GIL; instances are small JSON values)."""

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
from kiln.batch.pipeline import score_chunks
from kiln.handlers import backends
from kiln.handlers.signature import input_names

PARENT_POLL_S = 0.5


class LocalScorer:
    def __init__(self, model_path: Path, signature, batch_size: int,
                 workers: int | None = None, intra_op_threads: int | None = None):
        cores = os.cpu_count() or 1
        self.signature = signature
        self.batch_size = batch_size
        self.workers = workers or cores
        self.backend = backends.load_backend(str(model_path),
                                             intra_op_threads=intra_op_threads or cores,
                                             input_names=input_names(signature))

    def score(self, chunks: Iterable[Chunk]) -> Iterator[tuple[Chunk, Scored]]:
        def finish(part: Chunk, decoded: scoring.Decoded) -> Scored:
            return scoring.score(self.backend, part, decoded, self.batch_size, self.signature)

        return self.pipeline(chunks, finish)

    def pipeline(self, chunks: Iterable[Chunk], finish: Callable) -> Iterator[tuple[Chunk,
                                                                                   Scored]]:
        """Parts of batch_size inputs read and decoded in the pool, then finish(part,
        decoded) -> Scored in this thread, in order (the benchmark times decoding alone
        with a finish that does nothing)."""
        chunks = iter(chunks)
        first = next(chunks, None)
        if first is None:
            return
        with self._pool(images=scoring.decodes_images(first, self.signature)) as pool:
            # partial of a module-level function: picklable for worker processes
            decode = functools.partial(scoring.decode_chunk, signature=self.signature)
            yield from score_chunks(chain([first], chunks), self.batch_size, pool, decode,
                                    finish, ahead=2 * self.workers + 1)

    def _pool(self, images: bool) -> Executor:
        if images:
            # spawn, not fork: this process already runs ONNX Runtime's thread pool
            return ProcessPoolExecutor(self.workers,
                                       mp_context=multiprocessing.get_context("spawn"),
                                       initializer=exit_with_parent, initargs=(os.getpid(),))
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
