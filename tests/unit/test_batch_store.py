"""batch.store: a chunk counts as finished only when whole, and --resume picks up exactly
the finished ones."""

import csv
import io
import json

import pytest

from kiln.batch import store as store_module
from kiln.batch.chunks import BatchError, Scored, record
from kiln.batch.store import ChunkStore, csv_body, parse_rows, parts_dir

JOB = {"name": "tiny", "input": "/in.csv", "chunk_size": 2}


def _records(start, n):
    return [record(str(i), "benign", 0.75) for i in range(start, start + n)]


def _scored(start, n):
    return Scored.from_records(_records(start, n))


def test_finished_chunks_survive_a_reopen(tmp_path):
    store = ChunkStore(tmp_path / "out.csv", JOB)
    assert store.open(resume=False) == {}
    store.write_chunk(0, _scored(0, 2))
    store.write_chunk(1, Scored.from_records(_records(2, 1) + [record("3", error="bad, \"x\"")]))
    again = ChunkStore(tmp_path / "out.csv", JOB)
    done = again.open(resume=True)
    assert sorted(done) == [0, 1]
    assert (done[1]["rows"], done[1]["failed"]) == (2, 1)
    rows = [r for chunk in again.chunks() for r in chunk.records()]
    assert rows == _records(0, 3) + [record("3", error='bad, "x"')]


def test_a_torn_manifest_line_is_dropped_and_the_next_append_starts_clean(tmp_path):
    store = ChunkStore(tmp_path / "out.csv", JOB)
    store.open(resume=False)
    store.write_chunk(0, _scored(0, 2))
    with open(store.manifest, "ab") as f:
        f.write(b'{"chunk": 1, "file": "chunk-0000')  # the crash came mid-append
    again = ChunkStore(tmp_path / "out.csv", JOB)
    assert sorted(again.open(resume=True)) == [0]
    again.write_chunk(1, _scored(2, 2))
    lines = [json.loads(x) for x in again.manifest.read_text().splitlines()]
    assert [line.get("chunk") for line in lines] == [None, 0, 1]


def test_a_damaged_or_missing_chunk_file_is_not_finished(tmp_path):
    store = ChunkStore(tmp_path / "out.csv", JOB)
    store.open(resume=False)
    store.write_chunk(0, _scored(0, 2))
    store.write_chunk(1, _scored(2, 2))
    store.write_chunk(2, _scored(4, 2))
    (store.dir / "chunk-000000.csv").write_text('0,benign,0.75,\r\n')  # same name, other bytes
    (store.dir / "chunk-000002.csv").unlink()
    assert sorted(ChunkStore(tmp_path / "out.csv", JOB).open(resume=True)) == [1]


def test_temporary_files_are_never_chunks_and_are_cleared(tmp_path):
    store = ChunkStore(tmp_path / "out.csv", JOB)
    store.open(resume=False)
    (store.dir / ".chunk-000000.csv.tmp-123").write_text('0,benign,0.75,\r\n')
    assert ChunkStore(tmp_path / "out.csv", JOB).open(resume=True) == {}
    assert sorted(p.name for p in store.dir.iterdir()) == ["manifest.jsonl"]


def test_an_earlier_run_needs_resume_and_the_same_job(tmp_path):
    store = ChunkStore(tmp_path / "out.csv", JOB)
    store.open(resume=False)
    store.write_chunk(0, _scored(0, 2))
    with pytest.raises(BatchError, match="pass --resume to continue it"):
        ChunkStore(tmp_path / "out.csv", JOB).open(resume=False)
    with pytest.raises(BatchError, match="is from a different job"):
        ChunkStore(tmp_path / "out.csv", {**JOB, "chunk_size": 3}).open(resume=True)
    assert parts_dir(tmp_path / "out.csv") == tmp_path / "out.csv.parts"


def _read_back(body: bytes) -> Scored:
    return parse_rows(csv.reader(io.StringIO(body.decode(), newline="")))


@pytest.mark.parametrize("arrow", [True, False])
@pytest.mark.parametrize("quoted", [False, True])
def test_chunk_files_read_back_as_the_rows(quoted, arrow, monkeypatch):
    """Written by Arrow where it is installed and no cell needs quoting (floats in their
    shortest form: "1" for 1.0), else as the csv module writes them, byte for byte."""
    if not arrow:
        monkeypatch.setattr(store_module, "arrow_csv", lambda: None)
    special = 'a "b", c\r\nd' if quoted else "plain"
    probabilities = [0.9999672174453735, None, 1 / 3, 1.0, 1e-05, 5e-324, 0.1]
    n = len(probabilities)
    scored = Scored([str(i) for i in range(n - 2)] + ["dir/1.png", special],
                    ["7", None, "3", "a", "b", "c", "d"], probabilities,
                    [None, f"bad: {special}"] + [None] * (n - 2))
    body = csv_body(scored)
    assert _read_back(body) == scored
    assert body.endswith(b"\r\n") and (quoted or body.count(b"\r\n") == n)
    text = io.StringIO()
    csv.writer(text).writerows(scored.rows())
    by_arrow = arrow and not quoted and store_module.arrow_csv() is not None
    assert (body == text.getvalue().encode()) is not by_arrow
    if by_arrow:
        assert body.splitlines()[3:6] == [b"3,a,1,", b"4,b,0.00001,", b"dir/1.png,c,5e-324,"]
