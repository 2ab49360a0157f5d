"""--via local: the exported ONNX model in this process, with ONNX Runtime. Threads read and
decode the next parts while the session scores the current one."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from batch import scoring
from batch.chunks import Chunk
from batch.handler_modules import backends
from batch.pipeline import score_chunks


class LocalScorer:
    def __init__(self, model_path: Path, signature, batch_size: int,
                 workers: int | None = None, intra_op_threads: int | None = None):
        cores = os.cpu_count() or 1
        self.signature = signature
        self.batch_size = batch_size
        self.workers = workers or cores
        self.backend = backends().load_backend(str(model_path),
                                               intra_op_threads=intra_op_threads or cores)

    def score(self, chunks: Iterable[Chunk]) -> Iterator[tuple[Chunk, list[dict]]]:
        signature = self.signature

        def finish(part, decoded):
            probabilities = scoring.run_batched(self.backend, decoded.rows, self.batch_size)
            return scoring.records(part, decoded, probabilities, signature)

        with ThreadPoolExecutor(self.workers, thread_name_prefix="kiln-decode") as pool:
            yield from score_chunks(chunks, self.batch_size, pool,
                                    lambda part: scoring.decode_chunk(part, signature),
                                    finish, ahead=2 * self.workers + 1)

    def close(self) -> None:
        pass
