"""Model output rows as answers: THE one implementation, used by the TorchServe handler, the
Open Inference Protocol encoder and batch jobs alike (docs/declaration.md, "Outputs").

Every function raises ValueError (not BadInput: the request was fine) when the model's output
does not fit the signature, so that the caller answers 500 instead of sending invalid JSON.
"""

import numpy as np

from kiln.handlers.signature import DEFAULT_THRESHOLD, DEFAULT_TOP_K

LABELLED_KINDS = ("multiclass", "binary")


# What a client is told when the model's output for its input is NaN or infinite (a 400 for
# that request; a batch job's error for that row).
NON_FINITE_ANSWER = ("the model's output for this input is not a finite number (NaN or "
                     "infinity), so it has no answer: check the input is within the ranges the "
                     "model was trained on")


class NonFiniteOutput(ValueError):
    """The model returned NaN or infinity; `row` is the first row that holds one. The handler
    answers that request with a 400 (the input was taken, the model has no answer for it)."""

    def __init__(self, message, row):
        super().__init__(message)
        self.row = row


def output_rows(model_output, output):
    """The model's output as float32 [N, K] checked against the signature's output (raw
    outputs keep their shape)."""
    rows = np.asarray(model_output, dtype=np.float32)
    kind = output["kind"]
    if kind != "raw":
        rows = rows.reshape(len(rows), -1)
    finite = np.isfinite(rows).reshape(len(rows), -1).all(axis=1)
    if not finite.all():
        what = "value" if kind in ("regression", "raw") else "probability"
        row = int(np.argmin(finite))
        raise NonFiniteOutput(f"model returned a non-finite {what}: {rows[row].tolist()}", row)
    if kind == "binary":
        if rows.shape[1] != 1:
            raise ValueError(f"binary model returned {rows.shape[1]} values per row, expected 1")
    elif kind in ("multiclass", "multilabel"):
        if rows.shape[1] != len(output["labels"]):
            raise ValueError(f"model returned {rows.shape[1]} probabilities for "
                             f"{len(output['labels'])} labels")
    elif kind == "regression" and rows.shape[1] != len(output["names"]):
        raise ValueError(f"model returned {rows.shape[1]} values for "
                         f"{len(output['names'])} names")
    return rows


def answers(model_output, output, top_k=None):
    """One answer dict per row of model output. top_k overrides the signature's."""
    rows = output_rows(model_output, output)
    kind = output["kind"]
    if kind == "multiclass":
        return _multiclass(rows, output, top_k or output.get("top_k", DEFAULT_TOP_K))
    if kind == "binary":
        labels, probabilities = best(rows, output)
        return [{"label": label, "probability": p}
                for label, p in zip(labels, probabilities, strict=True)]
    if kind == "multilabel":
        return _multilabel(rows, output)
    if kind == "regression":
        return _regression(rows, output)
    return [{"output": row.tolist()} for row in rows]


def best(model_output, output):
    """(labels, probabilities) of each row's predicted label, as Python lists: binary, the
    label on its side of the threshold and the probability of that label (labels[0] gets
    1 - p); multiclass, the first of equal maxima."""
    chosen, probability = best_indices(output_rows(model_output, output), output)
    labels = np.asarray(output["labels"], dtype=object)
    return labels[chosen].tolist(), probability.tolist()


def best_indices(rows, output):
    """best() as arrays, on rows output_rows() gave: (index into labels, probability as
    float64) of each row's answer."""
    if output["kind"] == "binary":
        positive = rows[:, 0].astype(np.float64)
        upper = positive >= output.get("threshold", DEFAULT_THRESHOLD)
        return upper.astype(np.intp), np.where(upper, positive, 1.0 - positive)
    if output["kind"] == "multiclass":
        chosen = rows.argmax(axis=1)
        return chosen, rows[np.arange(len(rows)), chosen].astype(np.float64)
    raise ValueError(f"a {output['kind']} output has no single label per row")


def probability_table(model_output, output):
    """[N, len(labels)] float32: column i is the probability of labels[i] (binary models
    too, whose graph returns only the probability of labels[1])."""
    rows = output_rows(model_output, output)
    if output["kind"] == "binary":
        rows = np.hstack([1.0 - rows, rows])
    return rows


def predicted_labels(model_output, output):
    """Each row's answer label as a string: the label (multiclass, binary), or the JSON list
    of labels at or over their threshold (multilabel)."""
    if output["kind"] == "multilabel":
        import json

        return [json.dumps(answer["labels"]) for answer in _multilabel(
            output_rows(model_output, output), output)]
    return best(model_output, output)[0]


def _multiclass(rows, output, top_k):
    labels = output["labels"]
    # Stable sort: equal probabilities keep label order, so answers are reproducible.
    order = np.argsort(-rows, axis=1, kind="stable")[:, : max(1, top_k)]
    out = []
    for row, ranks in zip(rows, order, strict=True):
        ranked = [{"label": labels[i], "probability": float(row[i])} for i in ranks]
        out.append({"label": ranked[0]["label"], "probability": ranked[0]["probability"],
                    "top_k": ranked})
    return out


def _multilabel(rows, output):
    labels = output["labels"]
    threshold = np.broadcast_to(np.asarray(output.get("threshold", DEFAULT_THRESHOLD),
                                           dtype=np.float64), (len(labels),))
    over = rows.astype(np.float64) >= threshold
    return [{"labels": [label for label, on in zip(labels, flags, strict=True) if on],
             "probabilities": dict(zip(labels, row.tolist(), strict=True))}
            for row, flags in zip(rows, over, strict=True)]


def _regression(rows, output):
    names, units = output["names"], output.get("units")
    out = []
    for row in rows:
        answer = {"values": dict(zip(names, row.tolist(), strict=True))}
        if units is not None:
            answer["units"] = dict(zip(names, units, strict=True))
        out.append(answer)
    return out
