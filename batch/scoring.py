"""Chunks to model rows and model outputs to records, with the handler's own codec, so that a
row scored here gets exactly the label, probability or error message the server gives it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kiln.batch.chunks import Chunk, Scored
from kiln.handlers import codec


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
            rows.append(codec.decode_request(raw, signature))
            positions.append(i)
        except codec.BadInput as err:
            errors[i] = str(err)
    return Decoded(_stack(rows, signature), positions, errors)


def _decode_values(chunk: Chunk, signature) -> Decoded:
    """Vectorised in slices of at most MAX_INSTANCES rows (the codec's limit); a slice with
    a bad row is decoded row by row, as the server sees a one-row request."""
    errors = list(chunk.errors)
    good = [i for i, e in enumerate(errors) if e is None]
    parts, positions = [], []
    for start in range(0, len(good), codec.MAX_INSTANCES):
        idx = good[start:start + codec.MAX_INSTANCES]
        try:
            parts.append(codec.rows_from_raw(chunk.values[idx], signature))
            positions += idx
            continue
        except codec.BadInput:
            pass
        for i in idx:
            try:
                parts.append(codec.rows_from_raw(chunk.values[i:i + 1], signature))
                positions.append(i)
            except codec.BadInput as err:
                errors[i] = str(err)
    rows = np.concatenate(parts) if parts else _stack([], signature)
    return Decoded(rows, positions, errors)


def _stack(rows, signature) -> np.ndarray:
    if rows:
        return np.stack(rows)
    return np.zeros((0, *signature["input"]["shape"][1:]), dtype=np.float32)


def best_answers(probabilities: np.ndarray, output) -> tuple[list[str], list[float]]:
    """(labels, probabilities) of the rows of model output: for each row what the server's
    encode_answer(row, output, top_k=1) gives as label and probability, computed for all
    rows at once. ValueError where the model's output is not a set of finite probabilities."""
    p = np.asarray(probabilities, dtype=np.float32)
    if not len(p):
        return [], []
    p = p.reshape(len(p), -1)
    labels = np.asarray(output["labels"], dtype=object)
    if not np.isfinite(p).all():
        bad = p[~np.isfinite(p).all(axis=1)][0]
        raise ValueError(f"model returned a non-finite probability: {bad.tolist()}")
    if output["kind"] == "binary":
        if p.shape[1] != 1:
            raise ValueError(f"binary model returned {p.shape[1]} values a row, expected 1")
        positive = p[:, 0].astype(np.float64)
        upper = positive >= 0.5
        best = np.where(upper, positive, 1.0 - positive)
        index = upper.astype(np.intp)
    else:
        if p.shape[1] != len(labels):
            raise ValueError(f"model returned {p.shape[1]} probabilities for {len(labels)} "
                             "labels")
        index = p.argmax(axis=1)  # the first of equal maxima, as encode_answer's stable sort
        best = p[np.arange(len(p)), index].astype(np.float64)
    return labels[index].tolist(), best.tolist()


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
    outs = [backend.run(rows[s:s + batch_size]) for s in range(0, len(rows), batch_size)]
    return np.concatenate(outs)
