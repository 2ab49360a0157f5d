"""Finished chunks on disk, and the manifest that says which ones are finished.

OUTPUT.parts/ holds chunk-NNNNNN.jsonl files and manifest.jsonl. A chunk is written to a
temporary name, fsynced and renamed, and only then is its line appended to the manifest (one
write, fsynced). A chunk counts as finished only if its manifest line is whole and its file
has the size and SHA-256 the line records: a torn write is never taken for a finished chunk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from batch.chunks import BatchError

log = logging.getLogger("kiln.batch")
MANIFEST = "manifest.jsonl"


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
    def __init__(self, output: Path, job: dict):
        self.dir = parts_dir(output)
        self.manifest = self.dir / MANIFEST
        self.job = job
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

    def write_chunk(self, index: int, records: list[dict]) -> dict:
        data = b"".join(_line(r) for r in records)
        name = f"chunk-{index:06d}.jsonl"
        write_atomic(self.dir / name, data)
        entry = {"chunk": index, "file": name, "rows": len(records),
                 "failed": sum(r["error"] is not None for r in records),
                 "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        fd = os.open(self.manifest, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, _line(entry))  # one write: a crash leaves a whole line or a torn one
            os.fsync(fd)
        finally:
            os.close(fd)
        self.done[index] = entry
        return entry

    def records(self) -> Iterator[list[dict]]:
        """Each finished chunk's records, in chunk order."""
        for index in sorted(self.done):
            text = (self.dir / self.done[index]["file"]).read_text(encoding="utf-8")
            yield [json.loads(line) for line in text.splitlines()]

    def remove(self) -> None:
        shutil.rmtree(self.dir)


def _line(value: dict) -> bytes:
    return (json.dumps(value, separators=(",", ":")) + "\n").encode()
