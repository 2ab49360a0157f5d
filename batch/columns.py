"""A job's output columns, by its model's output kind, and answers as those columns' cells.

Every output has `id` first and `error` last; between them:

- multiclass, binary: `label` and `probability` (what they always were);
- multilabel: `labels` (a JSON list) and `probabilities` (a JSON object, label -> p);
- regression: one number column per output name;
- raw: `output` (JSON).

A JSON column's cell is JSON text in CSV and Parquet and the JSON value itself in JSON Lines.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from kiln.handlers import answers

FIXED = ("id", "error")


@dataclass(frozen=True)
class Layout:
    answers: tuple[str, ...]  # the columns between id and error
    floats: tuple[str, ...] = ()  # columns of numbers
    json: tuple[str, ...] = ()  # columns of JSON text

    @property
    def columns(self) -> tuple[str, ...]:
        return ("id", *self.answers, "error")


LABELLED = Layout(("label", "probability"), floats=("probability",))
MULTILABEL = Layout(("labels", "probabilities"), json=("labels", "probabilities"))
RAW = Layout(("output",), json=("output",))


def layout_for(output) -> Layout:
    """The answer columns of a signature's output."""
    kind = output["kind"]
    if kind in answers.LABELLED_KINDS:
        return LABELLED
    if kind == "multilabel":
        return MULTILABEL
    if kind == "raw":
        return RAW
    names = tuple(output["names"])
    return Layout(names, floats=names)


def layout_of(columns) -> Layout:
    """The layout an output file's header says it was written with."""
    middle = tuple(columns[1:-1])
    for layout in (LABELLED, MULTILABEL, RAW):
        if middle == layout.answers:
            return layout
    return Layout(middle, floats=middle)


def clashes(output) -> list[str]:
    """Regression names that would collide with the id or error column."""
    if output["kind"] != "regression":
        return []
    return [name for name in output["names"] if name in FIXED]


def from_model(model_output, output, layout: Layout) -> list[list]:
    """The answer columns of the rows of model output: the label and probability from
    answers.best, every other kind from answers.answers (the server's one answer path)."""
    if not len(model_output):
        return [[] for _ in layout.answers]
    if layout == LABELLED:
        return list(answers.best(model_output, output))
    return from_answers(answers.answers(model_output, output), layout)


def from_answers(given: list[dict], layout: Layout) -> list[list]:
    """Answer dicts (as the handler encodes them) as the layout's answer columns."""
    if layout == LABELLED:
        return [[a["label"] for a in given], [a["probability"] for a in given]]
    if layout == MULTILABEL:
        return [[json.dumps(a["labels"]) for a in given],
                [json.dumps(a["probabilities"]) for a in given]]
    if layout == RAW:
        return [[json.dumps(a["output"]) for a in given]]
    return [[a["values"][name] for a in given] for name in layout.answers]
