"""What flows through a batch job: chunks of inputs in, records out."""

from __future__ import annotations

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
