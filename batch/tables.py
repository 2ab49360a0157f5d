"""Rows of a table (CSV, JSON Lines, Parquet) as model inputs.

A model of one features input takes the columns named like its feature names (any order,
other columns ignored) or, failing that, exactly F unnamed columns in signature order, as raw
values. A model of one image input takes H*W columns of flattened pixels (0-255); columns
named `id` or `label` are ignored.

Any other model (several inputs, or a tensor input) takes one column per input, named after
the input (other columns ignored), as instances {input name: value}: a tensor's cell is a
JSON array, a features input's a JSON object or array (in JSON Lines and Parquet the value
itself may stand in for the JSON text), an image's the path of a PNG or JPEG file (relative
to the table's folder) or its base64 bytes (or, in JSON Lines and Parquet, whatever the
handler takes for an image: bytes, a pixel array, {"b64": ...}).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

from kiln.batch.chunks import BatchError
from kiln.handlers import kinds
from kiln.handlers.errors import json_type, quoted
from kiln.handlers.signature import input_names

IGNORED_COLUMNS = ("id", "label")
BASE64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")


def takes_instances(signature) -> bool:
    """Whether a table's rows are instances (one column per input) rather than raw values."""
    specs = signature["inputs"]
    return len(specs) > 1 or not kinds.of(specs[0]).raw_table_rows


def width(signature) -> int:
    return math.prod(value_shape(signature))


def value_shape(signature) -> tuple[int, ...]:
    """Shape of one row's raw values: [F], [H, W] or [H, W, C] (a single-input model)."""
    spec = signature["inputs"][0]
    return tuple(kinds.of(spec).raw_shape(spec))


def column_plan(header: list[str], signature, source: str) -> list[int]:
    """Indices of the header's columns that make one row, in model order."""
    spec = signature["inputs"][0]
    names = spec.get("names")
    if names and set(names) <= set(header):
        return [header.index(name) for name in names]
    kept = [i for i, name in enumerate(header) if str(name).lower() not in IGNORED_COLUMNS]
    if len(kept) == width(signature):
        return kept
    what = (f"the {len(names)} feature columns {names[:2]}... or {len(names)} unnamed columns"
            if names else f"{width(signature)} pixel columns")
    raise BatchError(f"{source}: {len(header)} columns, expected {what}")


def input_columns(header: list[str], signature, source: str) -> list[int]:
    """Indices of the header's columns named after the inputs, in signature order."""
    names = input_names(signature)
    missing = [name for name in names if name not in header]
    if missing:
        raise BatchError(f"{source}: no column {quoted(missing)}; {signature['name']} takes "
                         f"one column per input, named after it: {quoted(names)}")
    return [header.index(name) for name in names]


def instance(cells: list, signature, folder: Path) -> dict:
    """One row's cells (one per input, in signature order) as {input name: value}, or
    ValueError saying which cell is wrong."""
    return {spec["name"]: cell_value(cell, spec, folder)
            for cell, spec in zip(cells, signature["inputs"], strict=True)}


def json_instance(value, signature, folder: Path) -> dict:
    """One JSON Lines value as {input name: value}: an object keyed by input name (other
    keys ignored), or a single-input model's value itself."""
    names = input_names(signature)
    if not isinstance(value, dict) or (len(names) == 1 and names[0] not in value):
        if len(names) > 1:
            raise ValueError(f"expected a JSON object keyed by input name ({quoted(names)}), "
                             f"got {json_type(value)}")
        value = {names[0]: value}
    missing = [name for name in names if name not in value]
    if missing:
        raise ValueError(f"no value for {quoted(missing)}: a line holds an object keyed by "
                         f"input name ({quoted(names)})")
    return instance([value[name] for name in names], signature, folder)


def cell_value(cell, spec, folder: Path):
    """A cell of the input `spec` as the value the handler takes for it."""
    name = spec["name"]
    if cell is None or (isinstance(cell, str) and not cell.strip()):
        raise ValueError(f"column '{name}' is empty")
    if kinds.of(spec).takes_encoded_images:
        return _image_cell(cell, name, folder)
    if not isinstance(cell, str):
        return cell  # a list, an object or a number, as JSON Lines and Parquet hold them
    try:
        return json.loads(cell)
    except json.JSONDecodeError as err:
        raise ValueError(f"column '{name}' is not valid JSON: {err.msg} at column "
                         f"{err.colno}") from None


def _image_cell(cell, name: str, folder: Path):
    """An image cell: bytes, a file's Path, base64 text as {"b64": ...}, or (in JSON Lines
    and Parquet) pixels or {"b64": ...} as they are."""
    if isinstance(cell, (bytes, bytearray)):
        return bytes(cell)
    if not isinstance(cell, str):
        return cell
    path = folder / cell
    try:
        if path.is_file():
            return path
    except OSError:  # a name too long for a path: base64, or nothing
        pass
    if BASE64.fullmatch(cell):
        return {"b64": cell}
    raise ValueError(f"column '{name}': no file {cell[:60]!r} (paths are relative to the "
                     "table's folder), and not base64")


def looks_like_header(cells: list[str]) -> bool:
    return any(not _is_number(c) for c in cells)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def cells_to_values(rows: list[list], names: list[str], shape) -> tuple[np.ndarray, list]:
    """Rows of cells (strings or numbers) as float64 [n, *shape], with an error per row whose
    cells are not numbers. NaN stays NaN: the handler rejects it as the server would."""
    n = len(rows)
    try:  # numpy parses numeric strings; it would also make None NaN, hence the check
        values = np.array(rows, dtype=np.float64).reshape(n, *shape)
        if not np.isnan(values).any() or not any(None in row for row in rows):
            return values, [None] * n
    except (ValueError, TypeError):
        pass
    values = np.zeros((n, math.prod(shape)), dtype=np.float64)
    errors: list[str | None] = [None] * n
    for i, row in enumerate(rows):
        try:
            values[i] = [_cell(cell, name) for cell, name in zip(row, names, strict=True)]
        except ValueError as err:
            errors[i] = str(err)
    return values.reshape(n, *shape), errors


def _cell(cell, name: str) -> float:
    if cell is None or (isinstance(cell, str) and not cell.strip()):
        raise ValueError(f"column '{name}' is empty")
    if isinstance(cell, bool):
        raise ValueError(f"column '{name}' is a boolean, not a number")
    try:
        return float(cell)
    except (TypeError, ValueError):
        raise ValueError(f"column '{name}' is not a number: {str(cell)[:40]!r}") from None


def arrow_csv():
    """pyarrow.csv, or None where pyarrow is not installed."""
    try:
        import pyarrow.csv
    except ImportError:
        return None
    return pyarrow.csv


def numbers_block(block: bytes, columns: int, plan: list[int], shape) -> np.ndarray | None:
    """CSV lines (no header) of `columns` cells as float64 [n, *shape] from the cells at
    `plan`, parsed by Arrow; None unless every line has `columns` cells and every picked cell
    is a number (then the caller takes the slow path, which says what is wrong where)."""
    pacsv = arrow_csv()
    import pyarrow as pa

    names = [f"c{i}" for i in range(columns)]
    picked = [names[i] for i in plan]
    try:
        table = pacsv.read_csv(
            pa.py_buffer(block),
            read_options=pacsv.ReadOptions(column_names=names),
            parse_options=pacsv.ParseOptions(ignore_empty_lines=False),
            convert_options=pacsv.ConvertOptions(
                include_columns=picked, column_types=dict.fromkeys(picked, pa.float64())))
    except pa.ArrowInvalid:
        return None
    if any(column.null_count for column in table.columns):  # empty cells, "nan", "NA"...
        return None
    values = np.column_stack([table.column(name).to_numpy() for name in picked])
    return values.reshape(len(values), *shape)
