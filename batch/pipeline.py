"""Ordered, bounded parallel work over the parts of chunks: the next chunks are read in a
thread, their parts worked on in a pool while the current one is finished, and chunks come
out whole and in input order."""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor

from kiln.batch.chunks import Chunk, Scored


def split(chunk: Chunk, size: int) -> list[Chunk]:
    """The chunk as consecutive parts of at most `size` inputs (same chunk index)."""
    parts = []
    for s in range(0, len(chunk), size):
        cut = slice(s, s + size)
        parts.append(Chunk(
            chunk.index, chunk.ids[cut],
            paths=None if chunk.paths is None else chunk.paths[cut],
            values=None if chunk.values is None else chunk.values[cut],
            instances=None if chunk.instances is None else chunk.instances[cut],
            errors=chunk.errors[cut],
        ))
    return parts or [chunk]


def ordered_map(pool: Executor, fn: Callable, items: Iterable[tuple], ahead: int) -> Iterator:
    """(context, fn(arg)) for the (context, arg) items, fn run in the pool (a process pool
    too: only fn and arg cross over), at most `ahead` in flight, in item order."""
    pending: deque = deque()
    try:
        for context, arg in items:
            pending.append((context, pool.submit(fn, arg)))
            if len(pending) >= ahead:
                context, future = pending.popleft()
                yield context, future.result()
        while pending:
            context, future = pending.popleft()
            yield context, future.result()
    finally:
        for _, future in pending:
            future.cancel()


def score_chunks(chunks: Iterable[Chunk], part_size: int, pool: Executor, work: Callable,
                 finish: Callable, ahead: int) -> Iterator[tuple[Chunk, Scored]]:
    """(chunk, its output rows) in order: work(part) runs in the pool, finish(part, result)
    -> the part's Scored in the caller's thread (where a model session can run undisturbed)."""

    def parts():
        for chunk in chunks:
            pieces = split(chunk, part_size)
            for k, piece in enumerate(pieces):
                yield (chunk, piece, k == len(pieces) - 1), piece

    done: list[Scored] = []
    for (chunk, piece, last), result in ordered_map(pool, work, parts(), ahead):
        done.append(finish(piece, result))
        if last:
            yield chunk, Scored.concat(done)
            done = []


_END = object()


def prefetched(items: Iterable, depth: int) -> Iterator:
    """The items in order, each exactly once, taken from `items` in a thread that keeps up
    to `depth` of them ready: reading and parsing the next chunks (file reads and Arrow
    release the GIL) overlaps whatever the caller does with the current one. An exception
    raised by `items` comes out here, after the items before it; closing this generator
    stops the thread (and closes `items`) before it returns."""
    ready: queue.Queue = queue.Queue(max(1, depth))
    stop = threading.Event()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                ready.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        it = iter(items)
        try:
            for item in it:
                if not put((item, None)):
                    return
            put((_END, None))
        except BaseException as err:  # noqa: BLE001 - handed over to the consumer
            put((_END, err))
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    reader = threading.Thread(target=produce, name="kiln-read", daemon=True)
    reader.start()
    try:
        while True:
            item, err = ready.get()
            if err is not None:
                raise err
            if item is _END:
                return
            yield item
    finally:
        stop.set()
        reader.join()
