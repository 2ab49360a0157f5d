"""The final OUTPUT, chosen by its extension: CSV, JSON Lines or Parquet, written to a
temporary name and renamed, so that OUTPUT is either absent or whole. Its columns are the
job's layout (batch/columns.py)."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from kiln.batch.chunks import BatchError
from kiln.batch.columns import Layout, layout_of
from kiln.batch.store import ChunkStore

OUTPUT_SUFFIXES = (".csv", ".jsonl", ".ndjson", ".parquet")


def check_output(path: Path) -> None:
    """Fails before any work if OUTPUT has a format this module cannot write."""
    suffix = path.suffix.lower()
    if suffix not in OUTPUT_SUFFIXES:
        raise BatchError(f"{path}: cannot write {suffix!r}; use one of "
                         f"{', '.join(OUTPUT_SUFFIXES)}")
    if suffix == ".parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise BatchError("writing Parquet needs pyarrow: pip install pyarrow") from None


def write_output(path: Path, store: ChunkStore) -> None:
    """The store's finished chunks, in order, as OUTPUT (a CSV is their bytes after a
    header: chunk files are written as CSV rows for that)."""
    suffix = path.suffix.lower()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if suffix == ".parquet":
        _write_parquet(tmp, store.chunks(), store.layout)
    else:
        with open(tmp, "wb") as f:
            if suffix == ".csv":
                f.write(_csv_header(store.layout.columns))
                for body in store.csv_bodies():
                    f.write(body)
            else:
                _write_jsonl(f, store.chunks(), store.layout)
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def _csv_header(columns) -> bytes:
    text = io.StringIO()
    csv.writer(text).writerow(columns)
    return text.getvalue().encode()


def _write_jsonl(f, chunks, layout: Layout) -> None:
    for scored in chunks:  # a JSON column holds the JSON value itself here
        records = _parsed_json(scored.records(), layout)
        f.write("".join(json.dumps(r) + "\n" for r in records).encode())


def _write_parquet(path: Path, chunks, layout: Layout) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([(name, pa.float64() if name in layout.floats else pa.string())
                        for name in layout.columns])
    with pq.ParquetWriter(path, schema) as writer:
        for scored in chunks:
            writer.write_table(pa.Table.from_pydict(
                dict(zip(layout.columns, scored.columns, strict=True)), schema=schema))


def read_output(path: Path) -> list[dict]:
    """OUTPUT back as records, the same whatever its format: numbers as floats, JSON columns
    as their values, empty cells None. For tests and checks."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        return _parsed_json(table.to_pylist(), layout_of(table.column_names))
    if suffix != ".csv":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        layout = layout_of(reader.fieldnames)
    records = [{name: (float(r[name]) if r[name] else None) if name in layout.floats
                else r[name] or None for name in layout.columns} for r in rows]
    return _parsed_json(records, layout)


def _parsed_json(records: list[dict], layout: Layout) -> list[dict]:
    for r in records:
        for name in layout.json:
            if r[name] is not None:
                r[name] = json.loads(r[name])
    return records
