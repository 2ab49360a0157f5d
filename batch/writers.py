"""The final OUTPUT, chosen by its extension: CSV, JSON Lines or Parquet, written to a
temporary name and renamed, so that OUTPUT is either absent or whole."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from kiln.batch.chunks import COLUMNS, BatchError
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
        _write_parquet(tmp, store.chunks())
    else:
        with open(tmp, "wb") as f:
            if suffix == ".csv":
                f.write(",".join(COLUMNS).encode() + b"\r\n")
                for body in store.csv_bodies():
                    f.write(body)
            else:
                _write_jsonl(f, store.chunks())
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_jsonl(f, chunks) -> None:
    for scored in chunks:
        f.write("".join(json.dumps(r) + "\n" for r in scored.records()).encode())


def _write_parquet(path: Path, chunks) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("id", pa.string()), ("label", pa.string()),
                        ("probability", pa.float64()), ("error", pa.string())])
    with pq.ParquetWriter(path, schema) as writer:
        for scored in chunks:
            writer.write_table(pa.Table.from_pydict(
                dict(zip(COLUMNS, (scored.ids, scored.labels, scored.probabilities,
                                   scored.errors), strict=True)), schema=schema))


def read_output(path: Path) -> list[dict]:
    """OUTPUT back as records (probability a float, empty cells None): for tests and checks."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if suffix != ".csv":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [{"id": r["id"], "label": r["label"] or None,
             "probability": float(r["probability"]) if r["probability"] else None,
             "error": r["error"] or None} for r in rows]
