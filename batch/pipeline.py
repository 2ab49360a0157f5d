"""Ordered, bounded parallel work over the parts of chunks: the next parts are worked on in a
pool while the current one is finished, and chunks come out whole and in input order."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor

from batch.chunks import Chunk


def split(chunk: Chunk, size: int) -> list[Chunk]:
    """The chunk as consecutive parts of at most `size` inputs (same chunk index)."""
    parts = []
    for s in range(0, len(chunk), size):
        cut = slice(s, s + size)
        parts.append(Chunk(
            chunk.index, chunk.ids[cut],
            paths=None if chunk.paths is None else chunk.paths[cut],
            values=None if chunk.values is None else chunk.values[cut],
            errors=chunk.errors[cut],
        ))
    return parts or [chunk]


def ordered_map(pool: Executor, fn: Callable, items: Iterable, ahead: int) -> Iterator:
    """fn over items in the pool, at most `ahead` in flight, results in item order."""
    pending: deque = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()


def score_chunks(chunks: Iterable[Chunk], part_size: int, pool: Executor, work: Callable,
                 finish: Callable, ahead: int) -> Iterator[tuple[Chunk, list[dict]]]:
    """(chunk, records) in order: work(part) runs in the pool, finish(part, result) -> the
    part's records in the caller's thread (where a model session can run undisturbed)."""

    def parts():
        for chunk in chunks:
            pieces = split(chunk, part_size)
            for k, piece in enumerate(pieces):
                yield chunk, piece, k == len(pieces) - 1

    def task(item):
        chunk, piece, last = item
        return chunk, piece, last, work(piece)

    done: list[dict] = []
    for chunk, piece, last, result in ordered_map(pool, task, parts(), ahead):
        done += finish(piece, result)
        if last:
            yield chunk, done
            done = []
