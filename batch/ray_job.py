"""--via ray: a Ray Data pipeline. Images are read with ray.data.read_binary_files, table rows
(already parsed by Kiln's readers, so that ids and bad rows match --via local) enter with
ray.data.from_items; map_batches runs on a pool of actors that each hold one ONNX Runtime
session, and the results come back to this process to be stored chunk by chunk.

Ray starts locally on the fly, or joins the cluster that RAY_ADDRESS names. The repository
goes to the workers as Ray's working_dir, and the model as bytes, so a remote cluster needs
neither a checkout nor the artifacts.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np

from kiln.batch import columns, scoring
from kiln.batch.chunks import BatchError, Chunk, Scored
from kiln.handlers import backends
from kiln.handlers.signature import input_names

log = logging.getLogger("kiln.batch")
REPO = Path(__file__).resolve().parent.parent
# What the workers need is batch/ and handlers/; the rest stays here.
EXCLUDES = [".git", ".venv", "artifacts", "run", "runs", "model_store", "tests", "loadtests",
            "deploy", "training", "docs", "**/__pycache__"]
WINDOW_CHUNKS = 8  # chunks per Ray dataset: bounded memory, and progress to store


class ModelActor:
    """One backend (ONNX Runtime or TorchScript, by the export's suffix) per actor; a batch of
    inputs in, a batch of output rows out (each as the JSON of its cells after the id: strings
    cross Ray's batches as they are)."""

    def __init__(self, model: bytes, suffix: str, signature, batch_size: int):
        self.signature, self.batch_size = signature, batch_size
        with tempfile.NamedTemporaryFile(suffix=suffix, delete=False) as f:
            f.write(model)
        self.backend = backends.load_backend(f.name, intra_op_threads=1,
                                             input_names=input_names(signature))
        os.unlink(f.name)

    def __call__(self, batch: dict) -> dict:
        keys = [str(k) for k in batch["key"]]
        errors = [e or None for e in batch["error"]]
        if "bytes" in batch:
            part = Chunk(0, keys, errors=errors)
            decoded = scoring.decode_images([bytes(b) for b in batch["bytes"]], errors,
                                            self.signature)
        else:
            if "instance" in batch:
                part = Chunk(0, keys, instances=[pickle.loads(bytes(b)) for b in
                                                 batch["instance"]], errors=errors)
            else:
                part = Chunk(0, keys, values=batch["values"], errors=errors)
            decoded = scoring.decode_chunk(part, self.signature)
        scored = scoring.score(self.backend, part, decoded, self.batch_size, self.signature)
        cells = [json.dumps(row[1:]) for row in scored.rows()]
        return {"key": batch["key"], "cells": np.array(cells, dtype=object)}


class RayScorer:
    def __init__(self, model_path: Path, signature, batch_size: int, actors: int):
        try:
            import ray
        except ImportError:
            raise BatchError("--via ray needs Ray: pip install 'kiln[ray]'") from None
        self.ray = ray
        self.model, self.suffix = Path(model_path).read_bytes(), Path(model_path).suffix
        self.signature, self.batch_size, self.actors = signature, batch_size, actors
        self.layout = columns.layout_for(signature["output"])
        self.started = not ray.is_initialized()
        if self.started:  # ray.init() joins RAY_ADDRESS's cluster when it is set
            ray.init(runtime_env={"working_dir": str(REPO), "excludes": EXCLUDES},
                     include_dashboard=False, logging_level=logging.WARNING,
                     log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        # An actor holds its CPU for the whole job: leave one for the read tasks, or the
        # pipeline waits forever on a small machine.
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.actors = max(1, min(actors, cpus - 1))

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()

    def score(self, chunks: Iterable[Chunk]) -> Iterator[tuple[Chunk, Scored]]:
        window: list[Chunk] = []
        for chunk in chunks:
            window.append(chunk)
            if len(window) == WINDOW_CHUNKS:
                yield from self._score_window(window)
                window = []
        if window:
            yield from self._score_window(window)

    def _dataset(self, window: list[Chunk]):
        data = self.ray.data
        if window[0].paths is not None:
            paths = [str(p) for c in window for p in c.paths]
            ds = data.read_binary_files(paths, include_paths=True)
            return ds.map_batches(_keyed_by_path, batch_format="numpy")
        if window[0].instances is not None:  # values of any structure: pickled
            items = [{"key": f"{k}:{i}", "instance": pickle.dumps(c.instances[i]),
                      "error": c.errors[i] or ""}
                     for k, c in enumerate(window) for i in range(len(c))]
        else:
            items = [{"key": f"{k}:{i}", "values": c.values[i], "error": c.errors[i] or ""}
                     for k, c in enumerate(window) for i in range(len(c))]
        return data.from_items(items)

    def _score_window(self, window: list[Chunk]):
        sent = [absolute_paths(c) for c in window]
        ds = self._dataset(sent).map_batches(
            ModelActor,
            fn_constructor_args=(self.model, self.suffix, self.signature, self.batch_size),
            batch_size=self.batch_size, batch_format="numpy",
            compute=self.ray.data.ActorPoolStrategy(size=self.actors))
        results = {}
        for batch in ds.iter_batches(batch_format="numpy", batch_size=4096):
            for key, cells in zip(batch["key"], batch["cells"], strict=True):
                results[str(key)] = json.loads(cells)
        for k, (chunk, as_sent) in enumerate(zip(window, sent, strict=True)):
            keys = ([str(p) for p in as_sent.paths] if as_sent.paths is not None
                    else [f"{k}:{i}" for i in range(len(chunk))])
            yield chunk, Scored.from_rows([(row_id, *results[key]) for row_id, key
                                           in zip(chunk.ids, keys, strict=True)], self.layout)


def absolute_paths(chunk: Chunk) -> Chunk:
    """The chunk with its image files (and an instance's image-file cells) named from the
    root: Ray's workers run in a folder of their own, where a path relative to this
    process's current folder names nothing."""
    paths = None if chunk.paths is None else [p.absolute() for p in chunk.paths]
    instances = None if chunk.instances is None else [
        None if row is None else {name: cell.absolute() if isinstance(cell, Path) else cell
                                  for name, cell in row.items()}
        for row in chunk.instances]
    return replace(chunk, paths=paths, instances=instances)


def _keyed_by_path(batch: dict) -> dict:
    return {"key": batch["path"], "bytes": batch["bytes"],
            "error": np.full(len(batch["path"]), "", dtype=object)}
