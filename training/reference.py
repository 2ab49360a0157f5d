"""The reference statistics export writes into signature.json (docs/signature.md,
"reference"): what the training split looks like, for the handler's drift scores and the
alert on the answers' label mix (kiln.handlers.drift and watch)."""

from __future__ import annotations

import numpy as np

from kiln.handlers import drift, kinds


def reference(inputs: list[dict], output: dict, graph_inputs, targets) -> dict:
    """Statistics of the training split: `graph_inputs`, one array per input as the model
    gets it (the handler's own representation), and `targets`, the training labels (class
    indices, multi-hot rows) or regression targets."""
    found = {"rows": len(targets), "inputs": {}}
    for spec, rows in zip(inputs, graph_inputs, strict=True):
        names, values = kinds.of(spec).statistics(spec, np.asarray(rows))
        if names:
            found["inputs"][spec["name"]] = {
                name: drift.reference_of(values[:, i]) for i, name in enumerate(names)}
    targets = np.asarray(targets)
    if output["kind"] in ("multiclass", "binary"):
        counts = np.bincount(targets.astype(np.intp), minlength=len(output["labels"]))
        found["labels"] = dict(zip(output["labels"], (counts / len(targets)).tolist(),
                                   strict=True))
    elif output["kind"] == "multilabel":
        found["labels"] = dict(zip(output["labels"], targets.mean(axis=0).tolist(),
                                   strict=True))
    elif output["kind"] == "regression":
        columns = targets.reshape(len(targets), -1)
        # Deciles: the edges are also the buckets of the served values' histogram.
        found["outputs"] = {name: drift.reference_of(columns[:, i], bins=10)
                            for i, name in enumerate(output["names"])}
    return found
