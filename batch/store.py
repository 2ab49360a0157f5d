"""Finished chunks on disk, and the manifest that says which ones are finished.

OUTPUT.parts/ holds chunk-NNNNNN.csv files (output rows, no header) and manifest.jsonl.
A chunk is written to a temporary name, fsynced and renamed, and only then is its line
appended to the manifest (one write, fsynced). A chunk counts as finished only if its
manifest line is whole and its file has the size and SHA-256 the line records: a torn write
is never taken for a finished chunk.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from itertools import chain
from pathlib import Path

from kiln.batch.chunks import BatchError, Scored
from kiln.batch.columns import LABELLED, Layout
from kiln.batch.tables import arrow_csv

log = logging.getLogger("kiln.batch")
MANIFEST = "manifest.jsonl"
CSV_SPECIAL = (",", '"', "\r", "\n")  # cells holding one of these are quoted


def parts_dir(output: Path) -> Path:
    return output.with_name(output.name + ".parts")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Temporary name, fsync, rename, fsync the folder: `path` is whole or absent."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class ChunkStore:
    def __init__(self, output: Path, job: dict, layout: Layout = LABELLED):
        self.dir = parts_dir(output)
        self.manifest = self.dir / MANIFEST
        self.job = job
        self.layout = layout
        self.done: dict[int, dict] = {}

    def open(self, resume: bool) -> dict[int, dict]:
        """Finished chunks by index (none when starting afresh)."""
        if self.manifest.exists() and not resume and len(self._read_lines()) > 1:
            raise BatchError(f"{self.dir} holds an earlier run of this job: pass --resume to "
                             "continue it, or delete that folder to start again")
        if not self.manifest.exists() or not resume:
            self.dir.mkdir(parents=True, exist_ok=True)
            write_atomic(self.manifest, _line({"job": self.job}))
            return {}
        lines = self._read_lines()
        if not lines or lines[0].get("job") != self.job:
            raise BatchError(f"{self.dir} is from a different job ({lines[0] if lines else '?'}"
                             f"), not {self.job}: delete it or change OUTPUT")
        self.done = {e["chunk"]: e for e in lines[1:] if self._intact(e)}
        # Rewrite without a torn last line, so that the next append starts a line of its own.
        write_atomic(self.manifest, b"".join(_line(e) for e in [lines[0], *self.done.values()]))
        for stray in self.dir.glob(".*.tmp-*"):
            stray.unlink()
        log.info("resuming: %d chunk(s) already finished in %s", len(self.done), self.dir)
        return self.done

    def _read_lines(self) -> list[dict]:
        entries = []
        for raw in self.manifest.read_bytes().splitlines():
            try:
                entries.append(json.loads(raw))
            except ValueError:
                log.warning("ignoring a torn manifest line in %s", self.manifest)
        return entries

    def _intact(self, entry: dict) -> bool:
        path = self.dir / entry["file"]
        try:
            data = path.read_bytes()
        except OSError:
            return False
        return len(data) == entry["bytes"] and hashlib.sha256(data).hexdigest() == entry["sha256"]

    def write_chunk(self, index: int, scored: Scored) -> dict:
        data = csv_body(scored)
        name = f"chunk-{index:06d}.csv"
        write_atomic(self.dir / name, data)
        entry = {"chunk": index, "file": name, "rows": len(scored), "failed": scored.failed,
                 "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        fd = os.open(self.manifest, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, _line(entry))  # one write: a crash leaves a whole line or a torn one
            os.fsync(fd)
        finally:
            os.close(fd)
        self.done[index] = entry
        return entry

    def chunks(self) -> Iterator[Scored]:
        """Each finished chunk's output rows, in chunk order."""
        for data in self.csv_bodies():
            yield parse_rows(csv.reader(io.StringIO(data.decode(), newline="")), self.layout)

    def csv_bodies(self) -> Iterator[bytes]:
        """Each finished chunk as CSV rows without a header, in chunk order."""
        for index in sorted(self.done):
            yield (self.dir / self.done[index]["file"]).read_bytes()

    def remove(self) -> None:
        shutil.rmtree(self.dir)


def csv_body(scored: Scored) -> bytes:
    """The rows as the csv module writes them (CRLF line ends, None as an empty cell); for
    a label and a probability where no cell needs quoting, by Arrow's CSV writer (4x faster
    than Python's formatting, mostly repr() of the probabilities, and without the GIL), or
    by plain string formatting where there is no pyarrow."""
    if scored.layout == LABELLED:
        labels = scored.answers[0]
        cells = "\0".join(chain(scored.ids, (x for x in labels if x is not None),
                                (x for x in scored.errors if x is not None)))
        if not any(c in cells for c in CSV_SPECIAL):
            fast = _arrow_csv_body(scored)
            if fast is not None:
                return fast
            return "".join(f"{i},{label},{p!r},\r\n" if e is None else f"{i},,,{e}\r\n"
                           for i, label, p, e in scored.rows()).encode()
    text = io.StringIO()
    csv.writer(text).writerows(scored.rows())
    return text.getvalue().encode()


def _arrow_csv_body(scored: Scored) -> bytes | None:
    """Cells that need no quoting, as CSV rows written by Arrow; None without pyarrow.
    A probability is written in its shortest form that reads back as the same float, as
    repr() writes it, but without repr's ".0" and exponents ("1", "0.00001")."""
    pacsv = arrow_csv()
    if pacsv is None:
        return None
    import pyarrow as pa

    try:
        options = pacsv.WriteOptions(include_header=False, quoting_style="none", eol="\r\n")
    except TypeError:  # a pyarrow older than its eol option
        return None
    ids, (labels, probabilities), errors = scored.ids, scored.answers, scored.errors
    table = pa.table([pa.array(ids, pa.string()), pa.array(labels, pa.string()),
                      pa.array(probabilities, pa.float64()), pa.array(errors, pa.string())],
                     names=list(scored.layout.columns))
    out = pa.BufferOutputStream()
    pacsv.write_csv(table, out, options)
    return out.getvalue().to_pybytes()


def parse_rows(rows: Iterable[list[str]], layout: Layout = LABELLED) -> Scored:
    """CSV cells (layout.columns) as Scored; an empty cell is None."""
    names = layout.columns
    columns = list(zip(*rows, strict=True)) or [() for _ in names]
    return Scored(*([float(x) if x else None for x in column] if name in layout.floats else
                    [x or None for x in column] for name, column in zip(names, columns,
                                                                         strict=True)),
                  layout=layout)


def _line(value: dict) -> bytes:
    return (json.dumps(value, separators=(",", ":")) + "\n").encode()
