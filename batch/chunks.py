"""What flows through a batch job: chunks of inputs in, records out."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

COLUMNS = ("id", "label", "probability", "error")


class BatchError(RuntimeError):
    """A job that cannot go on (bad input file, bad settings, server gone): the message says
    what to do. A bad row is never a BatchError: it gets an error record."""


@dataclass
class Chunk:
    """Consecutive inputs, in input order. Image files come as `paths`; table rows as raw
    `values` ([n, H, W] pixels or [n, F] features, float64). `errors[i]` is set when the
    reader could not make row i into values (its values are then zeros)."""

    index: int
    ids: list[str]
    paths: list[Path] | None = None
    values: np.ndarray | None = None
    errors: list[str | None] = field(default_factory=list)

    def __post_init__(self):
        if not self.errors:
            self.errors = [None] * len(self.ids)

    def __len__(self) -> int:
        return len(self.ids)


def record(row_id: str, label=None, probability=None, error=None) -> dict:
    """One output row: label and probability for a scored input, error for one that was not."""
    return {"id": row_id, "label": label, "probability": probability, "error": error}


@dataclass
class Scored:
    """Output rows column by column, in input order: a scored row has a label and a
    probability, a failed one an error (and None for the other two)."""

    ids: list[str]
    labels: list[str | None]
    probabilities: list[float | None]
    errors: list[str | None]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def failed(self) -> int:
        return len(self.errors) - self.errors.count(None)

    def rows(self) -> Iterator[tuple]:
        """(id, label, probability, error) tuples, in COLUMNS order."""
        return zip(self.ids, self.labels, self.probabilities, self.errors, strict=True)

    def records(self) -> list[dict]:
        return [dict(zip(COLUMNS, row, strict=True)) for row in self.rows()]

    @classmethod
    def from_records(cls, records: list[dict]) -> Scored:
        return cls(*([r[c] for r in records] for c in COLUMNS))

    @classmethod
    def concat(cls, parts: list[Scored]) -> Scored:
        if len(parts) == 1:
            return parts[0]
        return cls(*([x for p in parts for x in getattr(p, f)] for f in FIELDS))


FIELDS = ("ids", "labels", "probabilities", "errors")
