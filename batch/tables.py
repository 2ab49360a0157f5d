"""Rows of a table (CSV, JSON Lines, Parquet) as raw model values.

Feature models take the columns named like signature feature_names (any order, other columns
ignored) or, failing that, exactly F unnamed columns in signature order. Image models take
H*W columns of flattened pixels (0-255); columns named `id` or `label` are ignored.
"""

from __future__ import annotations

import math

import numpy as np

from kiln.batch.chunks import BatchError
from kiln.handlers.signature import raw_shape

IGNORED_COLUMNS = ("id", "label")


def width(signature) -> int:
    return math.prod(value_shape(signature))


def value_shape(signature) -> tuple[int, ...]:
    """Shape of one row's raw values: [F], [H, W] or [H, W, C] (a single-input model)."""
    return tuple(raw_shape(signature["inputs"][0]))


def column_plan(header: list[str], signature, source: str) -> list[int]:
    """Indices of the header's columns that make one row, in model order."""
    spec = signature["inputs"][0]
    names = spec.get("names") if spec["kind"] == "features" else None
    if names and set(names) <= set(header):
        return [header.index(name) for name in names]
    kept = [i for i, name in enumerate(header) if str(name).lower() not in IGNORED_COLUMNS]
    if len(kept) == width(signature):
        return kept
    what = (f"the {len(names)} feature columns {names[:2]}... or {len(names)} unnamed columns"
            if names else f"{width(signature)} pixel columns")
    raise BatchError(f"{source}: {len(header)} columns, expected {what}")


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
    cells are not numbers. NaN stays NaN: the codec rejects it as the server would."""
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
