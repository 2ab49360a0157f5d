"""Inputs of a batch job, read in chunks: a folder of images, .npy, CSV, JSON Lines, Parquet.

Each row gets a stable id: an image's path relative to the folder (POSIX form), a table row's
number (from 0, header excluded). A row that cannot be read gets an error, never a gap.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kiln.batch import tables
from kiln.batch.chunks import BatchError, Chunk
from kiln.handlers import answers, features, images
from kiln.handlers.errors import BadInput

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
TABLE_SUFFIXES = (".npy", ".csv", ".jsonl", ".ndjson", ".parquet")
UTF8_BOM = b"\xef\xbb\xbf"


@dataclass
class Source:
    total: int | None  # rows, when known up front (for the ETA)
    chunks: Callable[[], Iterator[Chunk]]
    kind: str  # "images" or "table"


def open_source(path: Path, signature, chunk_size: int) -> Source:
    """The reader for `path`, chosen by what it is; BatchError if it cannot be read."""
    check_batchable(signature)
    if path.is_dir():
        if signature["inputs"][0]["kind"] != "image":
            raise BatchError(f"{path} is a folder of images but {signature['name']} takes "
                             "features: give it a .npy, CSV, JSON Lines or Parquet file")
        return image_source(path, chunk_size)
    if not path.is_file():
        raise BatchError(f"{path}: no such file or folder")
    suffix = path.suffix.lower()
    readers = {".npy": npy_source, ".csv": csv_source, ".jsonl": jsonl_source,
               ".ndjson": jsonl_source, ".parquet": parquet_source}
    if suffix not in readers:
        raise BatchError(f"{path}: cannot read {suffix!r} files; use a folder of images or "
                         f"one of {', '.join(TABLE_SUFFIXES)}")
    return readers[suffix](path, signature, chunk_size)


def check_batchable(signature) -> None:
    """Batch jobs read one input a row (a file, a table row) and write a label and its
    probability; a model that takes several inputs needs one column per input, which these
    readers do not assemble yet."""
    specs = signature["inputs"]
    if len(specs) > 1:
        raise BatchError(f"{signature['name']} takes {len(specs)} inputs "
                         f"({', '.join(s['name'] for s in specs)}): batch jobs read models of "
                         "one input only, for now")
    if specs[0]["kind"] == "tensor":
        raise BatchError(f"{signature['name']} takes a tensor input: batch jobs read image "
                         "and features models only, for now")
    kind = signature["output"]["kind"]
    if kind not in answers.LABELLED_KINDS:
        raise BatchError(f"{signature['name']} answers {kind}: batch jobs write one label and "
                         f"its probability a row, for {' and '.join(answers.LABELLED_KINDS)} "
                         "models only, for now")


def _batched(items, size: int):
    it = iter(items)
    while batch := list(itertools.islice(it, size)):
        yield batch


def image_source(folder: Path, chunk_size: int) -> Source:
    files = sorted(
        (p.relative_to(folder).as_posix(), p) for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    )

    def chunks():
        for index, batch in enumerate(_batched(files, chunk_size)):
            yield Chunk(index, [rel for rel, _ in batch], paths=[p for _, p in batch])

    return Source(len(files), chunks, "images")


def _table_chunks(rows: Iterator, chunk_size: int, to_values) -> Iterator[Chunk]:
    """Chunks of consecutive table rows; to_values(rows) -> (values, errors)."""
    start = 0
    for index, batch in enumerate(_batched(rows, chunk_size)):
        values, errors = to_values(batch)
        ids = [str(i) for i in range(start, start + len(batch))]
        start += len(batch)
        yield Chunk(index, ids, values=values, errors=errors)


def npy_source(path: Path, signature, chunk_size: int) -> Source:
    array = np.load(path, mmap_mode="r", allow_pickle=False)
    shape = tables.value_shape(signature)
    if array.ndim < 1 or array.dtype.kind not in "iuf" or (
            array.size and array[0].size != tables.width(signature)):
        raise BatchError(f"{path}: array of {array.dtype} {list(array.shape)}, expected "
                         f"numbers shaped [N, {', '.join(map(str, shape))}]")

    def chunks():
        for index, start in enumerate(range(0, len(array), chunk_size)):
            part = np.asarray(array[start:start + chunk_size], dtype=np.float64)
            ids = [str(i) for i in range(start, start + len(part))]
            yield Chunk(index, ids, values=part.reshape(len(part), *shape))

    return Source(len(array), chunks, "table")


def _count_lines(path: Path) -> int:
    return _scan(path)[0]


def _scan(path: Path) -> tuple[int, bool]:
    """(newlines, whether each line is one CSV row): no quotes (which may hold line breaks)
    and no bare carriage returns (which the csv module also takes for line ends)."""
    lines, quotes, crs, crlfs, last = 0, 0, 0, 0, b""
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            lines += block.count(b"\n")
            quotes += block.count(b'"')
            if b"\r" in block or last == b"\r":  # a CRLF may straddle two blocks
                crs += block.count(b"\r")
                crlfs += (last + block).count(b"\r\n")
            last = block[-1:]
    return lines, quotes == 0 and crs == crlfs


def csv_source(path: Path, signature, chunk_size: int) -> Source:
    with open(path, newline="", encoding="utf-8-sig") as f:
        first = next(csv.reader(f), None)
    if first is None:
        return Source(0, lambda: iter(()), "table")
    has_header = tables.looks_like_header(first)
    header = first if has_header else [str(i) for i in range(len(first))]
    plan = tables.column_plan(header, signature, str(path))
    names = [header[i] for i in plan]
    shape = tables.value_shape(signature)

    def to_values(rows):
        whole = plan == list(range(len(header)))
        picked = rows if whole else [[row[i] if i < len(row) else "" for i in plan]
                                     for row in rows]
        values, errors = tables.cells_to_values(picked, names, shape)
        for i, row in enumerate(rows):
            if len(row) != len(header):
                errors[i] = f"row has {len(row)} cells, the header {len(header)}"
        return values, errors

    def chunks():
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            if has_header:
                next(reader)
            yield from _table_chunks(reader, chunk_size, to_values)

    def line_chunks():
        """The same chunks, a block of lines at a time: Arrow parses a block whose cells are
        all numbers; any other block goes through to_values, as above."""
        with open(path, "rb") as f:
            if has_header:
                f.readline()
            start = 0
            for index, lines in enumerate(_batched(f, chunk_size)):
                if index == 0 and not has_header:
                    lines[0] = lines[0].removeprefix(UTF8_BOM)
                values = tables.numbers_block(b"".join(lines), len(header), plan, shape)
                if values is not None and len(values) == len(lines):
                    errors = [None] * len(lines)
                else:
                    values, errors = to_values(list(csv.reader(ln.decode() for ln in lines)))
                ids = [str(i) for i in range(start, start + len(lines))]
                start += len(lines)
                yield Chunk(index, ids, values=values, errors=errors)

    lines, one_row_a_line = _scan(path)
    fast = one_row_a_line and tables.arrow_csv() is not None
    return Source(lines - int(has_header), line_chunks if fast else chunks, "table")


def _json_row(line: str, signature) -> np.ndarray:
    """One JSON Lines row as raw values, or BadInput with the handler's own message."""
    try:
        value = json.loads(line)
    except json.JSONDecodeError as err:
        raise BadInput(f"not valid JSON: {err.msg} at column {err.colno}") from None
    spec = signature["inputs"][0]
    if spec["kind"] == "features":
        return features.features_from_json(value, spec)
    shape = images.pixel_shape(spec)
    if isinstance(value, list) and len(value) == math.prod(shape) and not isinstance(
            value[0], list):
        value = np.asarray(value).reshape(shape).tolist()
    return images.pixels_from_json(value, spec)


def jsonl_source(path: Path, signature, chunk_size: int) -> Source:
    """One JSON value a line: an object of named features, a list of numbers, or pixels
    (a flat list of H*W values, [H][W], or {"pixels": ...}). Blank lines are not rows."""
    shape = tables.value_shape(signature)
    bad_input = BadInput

    def to_values(lines):
        values = np.zeros((len(lines), *shape), dtype=np.float64)
        errors: list[str | None] = [None] * len(lines)
        for i, line in enumerate(lines):
            try:
                values[i] = _json_row(line, signature)
            except bad_input as err:
                errors[i] = str(err)
        return values, errors

    def chunks():
        with open(path, encoding="utf-8-sig") as f:
            yield from _table_chunks((ln for ln in f if ln.strip()), chunk_size, to_values)

    return Source(_count_lines(path), chunks, "table")


def parquet_source(path: Path, signature, chunk_size: int) -> Source:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise BatchError("reading Parquet needs pyarrow: pip install pyarrow") from None
    parquet = pq.ParquetFile(path)
    header = parquet.schema_arrow.names
    names = [header[i] for i in tables.column_plan(header, signature, str(path))]
    shape = tables.value_shape(signature)

    def to_values(batch):
        columns = [batch.column(name) for name in names]
        if all(c.null_count == 0 and c.type.num_fields == 0 and _numeric(c) for c in columns):
            values = np.column_stack([c.to_numpy(zero_copy_only=False) for c in columns])
            return values.astype(np.float64).reshape(len(batch), *shape), [None] * len(batch)
        rows = [list(r) for r in zip(*(c.to_pylist() for c in columns), strict=True)]
        return tables.cells_to_values(rows, names, shape)

    def chunks():
        start = 0
        for index, batch in enumerate(parquet.iter_batches(batch_size=chunk_size,
                                                           columns=names)):
            values, errors = to_values(batch)
            ids = [str(i) for i in range(start, start + len(batch))]
            start += len(batch)
            yield Chunk(index, ids, values=values, errors=errors)

    return Source(parquet.metadata.num_rows, chunks, "table")


def _numeric(column) -> bool:
    import pyarrow.types as pt

    return pt.is_integer(column.type) or pt.is_floating(column.type)
