"""batch.writers: each output format holds every record, errors included, and reads back."""

import pytest

from kiln.batch.chunks import BatchError, Scored, record
from kiln.batch.store import ChunkStore
from kiln.batch.writers import check_output, read_output, write_output

CHUNKS = [[record("a.png", "7", 0.9999672174453735), record("b.png", error="PNG image could "
                                                             "not be decoded")],
          [record("c/d.png", "1", 0.5)]]


def _store(path):
    """A job's store of finished chunks, as write_output gets it."""
    store = ChunkStore(path, {"name": "t", "input": "in", "chunk_size": 2})
    store.open(resume=False)
    for index, records in enumerate(CHUNKS):
        store.write_chunk(index, Scored.from_records(records))
    return store


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_round_trip(tmp_path, suffix):
    if suffix == ".parquet":
        pytest.importorskip("pyarrow", reason="Parquet needs pyarrow")
    path = tmp_path / f"out{suffix}"
    check_output(path)
    store = _store(path)
    write_output(path, store)
    assert read_output(path) == CHUNKS[0] + CHUNKS[1]
    store.remove()
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_csv_columns(tmp_path):
    path = tmp_path / "out.csv"
    write_output(path, _store(path))
    assert path.read_text().splitlines() == [
        "id,label,probability,error", "a.png,7,0.9999672174453735,",
        "b.png,,,PNG image could not be decoded", "c/d.png,1,0.5,"]


def test_unknown_output_format(tmp_path):
    with pytest.raises(BatchError, match="cannot write '.txt'; use one of .csv, .jsonl"):
        check_output(tmp_path / "out.txt")
