"""What flows through a batch job: chunks of inputs in, records out."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kiln.batch.columns import LABELLED, Layout

COLUMNS = LABELLED.columns


class BatchError(RuntimeError):
    """A job that cannot go on (bad input file, bad settings, server gone): the message says
    what to do. A bad row is never a BatchError: it gets an error record."""


@dataclass
class Chunk:
    """Consecutive inputs, in input order, in one of three forms: image files as `paths`;
    table rows of a single-input model as raw `values` ([n, H, W] pixels, [n, F] features
    or [n, ...] a fixed-shape tensor, float64); or, for any other model, `instances`, one
    {input name: value} per row, a value being what the handler takes in JSON, an image's
    bytes, or the Path of an image file. `errors[i]` is set when the reader could not make
    row i into an input (its values are then zeros, its instance None)."""

    index: int
    ids: list[str]
    paths: list[Path] | None = None
    values: np.ndarray | None = None
    instances: list[dict | None] | None = None
    errors: list[str | None] = field(default_factory=list)

    def __post_init__(self):
        if not self.errors:
            self.errors = [None] * len(self.ids)

    def __len__(self) -> int:
        return len(self.ids)


def record(row_id: str, label=None, probability=None, error=None) -> dict:
    """One output row of a multiclass or binary model: label and probability for a scored
    input, error for one that was not."""
    return {"id": row_id, "label": label, "probability": probability, "error": error}


class Scored:
    """Output rows column by column, in input order: ids, the layout's answer columns, and
    errors. A scored row has its answers, a failed one an error (and None for the answers).
    Scored(ids, labels, probabilities, errors) for a multiclass or binary model."""

    def __init__(self, ids: list, *columns: list, layout: Layout = LABELLED):
        *answers, errors = columns
        if len(answers) != len(layout.answers):
            raise ValueError(f"{len(answers)} answer columns for {layout.answers}")
        self.ids, self.answers, self.errors, self.layout = ids, answers, errors, layout

    def __len__(self) -> int:
        return len(self.ids)

    def __eq__(self, other) -> bool:
        return isinstance(other, Scored) and list(self.rows()) == list(other.rows()) and \
            self.layout == other.layout

    def __repr__(self) -> str:
        return f"Scored({self.records()!r})"

    @property
    def columns(self) -> list[list]:
        return [self.ids, *self.answers, self.errors]

    @property
    def failed(self) -> int:
        return len(self.errors) - self.errors.count(None)

    def rows(self) -> Iterator[tuple]:
        """(id, answers..., error) tuples, in layout.columns order."""
        return zip(self.ids, *self.answers, self.errors, strict=True)

    def records(self) -> list[dict]:
        columns = self.layout.columns
        return [dict(zip(columns, row, strict=True)) for row in self.rows()]

    @classmethod
    def from_records(cls, records: list[dict], layout: Layout = LABELLED) -> Scored:
        return cls(*([r[c] for r in records] for c in layout.columns), layout=layout)

    @classmethod
    def from_rows(cls, rows: list[tuple], layout: Layout = LABELLED) -> Scored:
        columns = [list(c) for c in zip(*rows, strict=True)] or [[] for _ in layout.columns]
        return cls(*columns, layout=layout)

    @classmethod
    def concat(cls, parts: list[Scored]) -> Scored:
        if len(parts) == 1:
            return parts[0]
        columns = zip(*(p.columns for p in parts), strict=True)
        return cls(*([x for part in column for x in part] for column in columns),
                   layout=parts[0].layout)
