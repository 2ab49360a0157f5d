"""batch.pipeline and the job's store writer under concurrency: every item once, in order,
errors where they happened, nothing left running after an early stop."""

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from kiln.batch import job
from kiln.batch.chunks import Chunk, Scored, record
from kiln.batch.pipeline import ordered_map, prefetched, score_chunks


def _counted(n, log, fail_at=None):
    try:
        for i in range(n):
            if i == fail_at:
                raise ValueError(f"bad item {i}")
            log.append(i)
            yield i
    finally:
        log.append("closed")


def test_prefetched_gives_every_item_once_in_order():
    taken = []
    assert list(prefetched(_counted(500, taken), depth=2)) == list(range(500))
    assert taken == [*range(500), "closed"]


def test_prefetched_raises_after_the_items_before_the_error():
    got = []
    with pytest.raises(ValueError, match="bad item 7"):
        for item in prefetched(_counted(20, [], fail_at=7), depth=3):
            got.append(item)
    assert got == list(range(7))


def test_closing_prefetched_stops_the_reader_and_closes_the_source():
    taken = []
    ahead = prefetched(_counted(10_000, taken), depth=2)
    assert [next(ahead) for _ in range(5)] == [0, 1, 2, 3, 4]
    ahead.close()  # returns once the reading thread has stopped
    assert taken[-1] == "closed"
    # five handed over, two queued, one waiting to be queued, at most
    assert len(taken) - 1 <= 5 + 2 + 1
    assert not [t for t in threading.enumerate() if t.name == "kiln-read"]


def test_ordered_map_keeps_order_when_later_work_finishes_first():
    second_done = threading.Event()

    def work(i):
        if i == 0:  # the first item cannot finish before the second has
            assert second_done.wait(timeout=30)
        if i == 1:
            second_done.set()
        return i * 10

    with ThreadPoolExecutor(2) as pool:
        out = list(ordered_map(pool, work, ((f"c{i}", i) for i in range(6)), ahead=3))
    assert out == [(f"c{i}", i * 10) for i in range(6)]


def _chunk(index, start, n):
    return Chunk(index, [str(i) for i in range(start, start + n)], paths=[None] * n)


def test_score_chunks_puts_parts_back_together_in_order():
    chunks = [_chunk(0, 0, 7), _chunk(1, 7, 1), _chunk(2, 8, 5)]

    def finish(part, ids):
        return Scored(ids, ["x"] * len(ids), [0.5] * len(ids), [None] * len(ids))

    with ThreadPoolExecutor(3) as pool:
        out = list(score_chunks(prefetched(chunks, 1), 2, pool, lambda part: part.ids[::-1][::-1],
                                finish, ahead=4))
    assert [c.index for c, _ in out] == [0, 1, 2]
    assert [s.ids for _, s in out] == [c.ids for c in chunks]


class _Store:
    def __init__(self):
        self.written = []

    def write_chunk(self, index, scored):
        self.written.append((index, len(scored)))


def _scored_chunks(n, fail_after=None):
    for i in range(n):
        if i == fail_after:
            raise RuntimeError("model gone")
        yield _chunk(i, 0, i + 1), Scored.from_records([record(str(k)) for k in range(i + 1)])


def test_stored_writes_every_chunk_once_in_order():
    store = _Store()
    assert list(job._stored(_scored_chunks(6), store)) == [1, 2, 3, 4, 5, 6]
    assert store.written == [(i, i + 1) for i in range(6)]


def test_stored_finishes_the_write_under_way_when_scoring_fails():
    store, reported = _Store(), []
    with pytest.raises(RuntimeError, match="model gone"):
        for rows in job._stored(_scored_chunks(6, fail_after=3), store):
            reported.append(rows)
    assert reported == [1, 2]  # chunk 2 was stored, but not yet reported
    assert store.written == [(0, 1), (1, 2), (2, 3)]


def test_stored_in_step_writes_each_chunk_before_the_next_is_scored():
    store, seen = _Store(), []

    def scored_chunks():
        for chunk, scored in _scored_chunks(4):
            seen.append(list(store.written))
            yield chunk, scored

    assert list(job._stored(scored_chunks(), store, behind=False)) == [1, 2, 3, 4]
    assert seen == [[(i, i + 1) for i in range(k)] for k in range(4)]
