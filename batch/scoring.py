"""Chunks to model inputs and model outputs to output rows, with the handler's own decoders
and its one answer path, so that a row scored here gets exactly the answer or error message
the server gives it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kiln.batch import columns
from kiln.batch.chunks import Chunk, Scored
from kiln.batch.columns import Layout
from kiln.handlers import images, inputs, kinds, rest
from kiln.handlers.answers import NON_FINITE_ANSWER
from kiln.handlers.errors import BadInput


@dataclass
class Decoded:
    """Model inputs of the decoded rows of a chunk, in order, as parts (each a list of
    arrays, one per signature input, of one or more rows; variable lengths are not padded
    across parts); `positions` are those rows' places in the chunk, `errors` cover every
    place."""

    parts: list[list[np.ndarray]]
    positions: list[int]
    errors: list[str | None]


def read_image(path: Path) -> tuple[bytes | None, str | None]:
    """(bytes, None) or (None, why the file could not be read)."""
    try:
        return path.read_bytes(), None
    except OSError as err:
        return None, f"cannot read the file: {err.strerror or err}"


def load_instance(instance: dict) -> tuple[dict | None, str | None]:
    """(the instance with each image file's bytes in place of its Path, None), or (None,
    why a file could not be read)."""
    loaded = {}
    for name, value in instance.items():
        if isinstance(value, Path):
            value, why = read_image(value)
            if value is None:
                return None, f"input '{name}': {why}"
        loaded[name] = value
    return loaded, None


def decodes_images(chunk: Chunk, signature) -> bool:
    """Whether decoding the chunk means decoding images (per-row Python work)."""
    return chunk.paths is not None or (chunk.instances is not None and any(
        kinds.of(spec).takes_encoded_images for spec in signature["inputs"]))


def decode_chunk(chunk: Chunk, signature) -> Decoded:
    if chunk.paths is not None:
        return _decode_images(chunk, signature)
    if chunk.instances is not None:
        return _decode_instances(chunk, signature)
    return _decode_values(chunk, signature)


def _decode_images(chunk: Chunk, signature) -> Decoded:
    raws, errors = [], list(chunk.errors)
    for i, path in enumerate(chunk.paths):
        raw, errors[i] = read_image(path)
        raws.append(raw)
    return decode_images(raws, errors, signature)


def decode_images(raws: list[bytes | None], errors: list[str | None], signature) -> Decoded:
    """Encoded images (None where `errors` says why there is none) as model rows: each
    decoded and framed as the server does it, then standardised together (one numpy pass
    instead of one per image; the same arithmetic, so the same rows)."""
    errors = list(errors)
    spec = signature["inputs"][0]
    rows, framed, positions = [], {}, []
    for i, raw in enumerate(raws):
        if raw is None:
            continue
        try:
            if kinds.of(spec).takes_encoded_images and images.is_encoded_image(raw):
                framed[len(rows)] = images.framed_unit_from_bytes(raw, spec)
                rows.append(None)
            else:  # whatever else a file holds: as a request body of it
                rows.append(rest.decode_request(raw, signature))
            positions.append(i)
        except BadInput as err:
            errors[i] = str(err)
    if framed:
        standardised = images.standardise_image(np.stack(list(framed.values())), spec)
        for k, row in zip(framed, standardised, strict=True):
            rows[k] = row
    return Decoded([[inputs.stack(rows, spec)]] if rows else [], positions, errors)


def _decode_instances(chunk: Chunk, signature) -> Decoded:
    """Each row's {input name: value} as the server decodes one JSON instance."""
    errors = list(chunk.errors)
    parts, positions = [], []
    for i, instance in enumerate(chunk.instances):
        if errors[i] is not None:
            continue
        loaded, errors[i] = load_instance(instance)
        if loaded is None:
            continue
        try:
            model_inputs, _ = rest.decode_body(loaded, signature)
        except BadInput as err:
            errors[i] = str(err)
            continue
        parts.append(model_inputs)
        positions.append(i)
    return Decoded(parts, positions, errors)


def _decode_values(chunk: Chunk, signature) -> Decoded:
    """Every good row in one vectorised pass; where one of them is bad, in slices of at
    most MAX_INSTANCES rows (the handler's limit), and a slice with a bad row row by row, as
    the server sees a one-row request. Rows are independent: the same rows either way."""
    spec = signature["inputs"][0]
    errors = list(chunk.errors)
    if errors.count(None) == len(errors):
        good = list(range(len(errors)))
    else:
        good = [i for i, e in enumerate(errors) if e is None]
    if not good:
        return Decoded([], [], errors)
    try:
        values = chunk.values if len(good) == len(chunk) else chunk.values[good]
        return Decoded([[inputs.rows_from_raw(values, spec, bounded=False)]], good, errors)
    except BadInput:
        pass
    parts, positions = [], []
    for start in range(0, len(good), inputs.MAX_INSTANCES):
        idx = good[start:start + inputs.MAX_INSTANCES]
        try:
            parts.append([inputs.rows_from_raw(chunk.values[idx], spec)])
            positions += idx
            continue
        except BadInput:
            pass
        for i in idx:
            try:
                parts.append([inputs.rows_from_raw(chunk.values[i:i + 1], spec)])
                positions.append(i)
            except BadInput as err:
                errors[i] = str(err)
    return Decoded(parts, positions, errors)


def model_batches(parts: list[list[np.ndarray]], batch_size: int,
                  signature) -> Iterator[list[np.ndarray]]:
    """The parts' rows, in order, as model inputs of at most batch_size rows each: what one
    model call takes, variable lengths padded to the longest row of that call."""
    pending, n = [], 0
    for part in parts:
        size, start = inputs.batch_size(part), 0
        while start < size:
            take = min(batch_size - n, size - start)
            pending.append(part if take == size else inputs.take(part, start, start + take))
            n, start = n + take, start + take
            if n == batch_size:
                yield _joined(pending, signature)
                pending, n = [], 0
    if pending:
        yield _joined(pending, signature)


def _joined(parts, signature) -> list[np.ndarray]:
    return parts[0] if len(parts) == 1 else inputs.join(parts, signature)


def answer_columns(backend, decoded: Decoded, batch_size: int, signature,
                   layout: Layout) -> tuple[list[list], list[int]]:
    """The model over the decoded rows, batch_size rows a call, as the layout's answer
    columns (one cell per decoded row with an answer), and the rows (indices in decoded
    order) whose model output is NaN or infinite: those have no answer, as the server
    answers such a row with a 400 and its neighbours with theirs."""
    out: list[list] = [[] for _ in layout.answers]
    finite_outputs, lost, seen = [], [], 0
    for batch in model_batches(decoded.parts, batch_size, signature):
        result = backend.run(batch)
        finite = np.isfinite(np.asarray(result, np.float32).reshape(len(result), -1)).all(axis=1)
        if not finite.all():
            lost += (seen + np.flatnonzero(~finite)).tolist()
            result = result[finite]
        seen += len(finite)
        if layout == columns.LABELLED:  # [N, K]: their answers in one vectorised pass below
            finite_outputs.append(result)
            continue
        cells = columns.from_model(result, signature["output"], layout)
        for column, more in zip(out, cells, strict=True):
            column += more
    if finite_outputs:
        joined = finite_outputs[0] if len(finite_outputs) == 1 else np.concatenate(
            finite_outputs)
        out = columns.from_model(joined, signature["output"], layout)
    return out, lost


def scored(chunk: Chunk, decoded: Decoded, answers: list[list], layout: Layout,
           lost: list[int] = ()) -> Scored:
    """The chunk's output rows, in order: answers where decoded (but for the `lost` decoded
    rows, whose model output was not finite), errors elsewhere."""
    n = len(chunk)
    positions, errors = decoded.positions, decoded.errors
    if lost:
        errors, gone = list(errors), set(lost)
        for k in gone:
            errors[positions[k]] = NON_FINITE_ANSWER
        positions = [pos for k, pos in enumerate(positions) if k not in gone]
    if len(positions) < n:
        spread = [[None] * n for _ in answers]
        for column, cells in zip(spread, answers, strict=True):
            for pos, cell in zip(positions, cells, strict=True):
                column[pos] = cell
        answers = spread
    return Scored(list(chunk.ids), *answers, list(errors), layout=layout)


def score(backend, chunk: Chunk, decoded: Decoded, batch_size: int, signature) -> Scored:
    """decoded (of chunk) through the model, as the chunk's output rows."""
    layout = columns.layout_for(signature["output"])
    answers, lost = answer_columns(backend, decoded, batch_size, signature, layout)
    return scored(chunk, decoded, answers, layout, lost)

