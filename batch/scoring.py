"""Chunks to model rows and model outputs to records, with the handler's own decoders and its
one answer path, so that a row scored here gets exactly the label, probability or error
message the server gives it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kiln.batch.chunks import Chunk, Scored
from kiln.handlers import answers, inputs, rest
from kiln.handlers.errors import BadInput


@dataclass
class Decoded:
    """Model rows for the inputs at `positions` of a chunk; `errors` for every position."""

    rows: np.ndarray
    positions: list[int]
    errors: list[str | None]


def read_image(path: Path) -> tuple[bytes | None, str | None]:
    """(bytes, None) or (None, why the file could not be read)."""
    try:
        return path.read_bytes(), None
    except OSError as err:
        return None, f"cannot read the file: {err.strerror or err}"


def decode_chunk(chunk: Chunk, signature) -> Decoded:
    if chunk.paths is not None:
        return _decode_images(chunk, signature)
    return _decode_values(chunk, signature)


def _decode_images(chunk: Chunk, signature) -> Decoded:
    raws, errors = [], list(chunk.errors)
    for i, path in enumerate(chunk.paths):
        raw, errors[i] = read_image(path)
        raws.append(raw)
    return decode_images(raws, errors, signature)


def decode_images(raws: list[bytes | None], errors: list[str | None], signature) -> Decoded:
    """Encoded images (None where `errors` says why there is none) as model rows."""
    errors = list(errors)
    rows, positions = [], []
    for i, raw in enumerate(raws):
        if raw is None:
            continue
        try:
            rows.append(rest.decode_request(raw, signature))
            positions.append(i)
        except BadInput as err:
            errors[i] = str(err)
    return Decoded(_stack(rows, signature), positions, errors)


def _decode_values(chunk: Chunk, signature) -> Decoded:
    """Vectorised in slices of at most MAX_INSTANCES rows (the handler's limit); a slice
    with a bad row is decoded row by row, as the server sees a one-row request."""
    spec = signature["inputs"][0]
    errors = list(chunk.errors)
    good = [i for i, e in enumerate(errors) if e is None]
    parts, positions = [], []
    for start in range(0, len(good), inputs.MAX_INSTANCES):
        idx = good[start:start + inputs.MAX_INSTANCES]
        try:
            parts.append(inputs.rows_from_raw(chunk.values[idx], spec))
            positions += idx
            continue
        except BadInput:
            pass
        for i in idx:
            try:
                parts.append(inputs.rows_from_raw(chunk.values[i:i + 1], spec))
                positions.append(i)
            except BadInput as err:
                errors[i] = str(err)
    rows = np.concatenate(parts) if parts else _stack([], signature)
    return Decoded(rows, positions, errors)


def _stack(rows, signature) -> np.ndarray:
    return inputs.stack(rows, signature["inputs"][0])


def best_answers(model_output: np.ndarray, output) -> tuple[list[str], list[float]]:
    """(labels, probabilities) of the rows of model output, as the server's answers give
    them (answers.best). ValueError where the output does not fit the signature."""
    if not len(model_output):
        return [], []
    return answers.best(model_output, output)


def scored(chunk: Chunk, decoded: Decoded, probabilities: np.ndarray, signature) -> Scored:
    """The chunk's output rows, in order: answers where decoded, errors elsewhere."""
    labels, best = best_answers(probabilities, signature["output"])
    n = len(chunk)
    if len(decoded.positions) < n:
        spread_labels, spread_best = [None] * n, [None] * n
        for pos, label, probability in zip(decoded.positions, labels, best, strict=True):
            spread_labels[pos], spread_best[pos] = label, probability
        labels, best = spread_labels, spread_best
    return Scored(list(chunk.ids), labels, best, list(decoded.errors))


def run_batched(backend, rows: np.ndarray, batch_size: int) -> np.ndarray:
    """The model over rows, batch_size rows a call."""
    if not len(rows):
        return np.zeros((0,), dtype=np.float32)
    outs = [backend.run([rows[s:s + batch_size]]) for s in range(0, len(rows), batch_size)]
    return np.concatenate(outs)
