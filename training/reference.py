"""The reference statistics export writes into signature.json (docs/signature.md,
"reference"): what the training split looks like, for the handler's drift scores and the
alert on the answers' label mix (kiln.handlers.drift and watch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kiln.handlers import drift, errors, kinds
from kiln.handlers import inputs as serving_inputs


def reference(inputs: list[dict], output: dict, graph_inputs, targets) -> dict:
    """Statistics of the training split: `graph_inputs`, one array per input as the model
    gets it (the handler's own representation), and `targets`, the training labels (class
    indices, multi-hot rows) or regression targets, or None."""
    found = {"rows": len(graph_inputs[0]), "inputs": {}}
    for spec, rows in zip(inputs, graph_inputs, strict=True):
        names, values = kinds.of(spec).statistics(spec, np.asarray(rows))
        if names:
            found["inputs"][spec["name"]] = {
                name: drift.reference_of(values[:, i]) for i, name in enumerate(names)}
    if targets is None:  # a user's reference without targets: inputs only
        return found
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


def declared(path: Path, inputs: list[dict], output: dict) -> dict:
    """The reference of a user's model from its declaration's [weights] reference: raw input
    values as a batch job takes them (one .npy for a model of one input; a .npz with one
    array per input name and, optionally, `target`), made model rows as the server makes them."""
    loaded = np.load(path, allow_pickle=False)
    if isinstance(loaded, np.ndarray):
        if len(inputs) != 1:
            raise ValueError(f"{path.name}: a model of {len(inputs)} inputs takes a .npz with "
                             "one array per input name")
        arrays = {inputs[0]["name"]: loaded}
    else:
        arrays = dict(loaded)
    missing = [spec["name"] for spec in inputs if spec["name"] not in arrays]
    if missing:
        raise ValueError(f"{path.name} has no array for input(s) {missing}")
    try:
        rows = [serving_inputs.rows_from_raw(np.asarray(arrays[spec["name"]], dtype=np.float64),
                                             spec, bounded=False) for spec in inputs]
    except errors.BadInput as err:
        raise ValueError(f"{path.name}: {err}") from None
    return reference(inputs, output, rows, arrays.get("target"))
