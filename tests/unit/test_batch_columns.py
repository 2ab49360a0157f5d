"""batch.columns.from_model for labelled outputs: the whole batch at once, and exactly the
label and probability that the server's encode_answer gives each row."""

import numpy as np
import pytest

from kiln.batch import columns
from kiln.handlers import answers


def best_answers(model_output, output):
    return columns.from_model(model_output, output, columns.LABELLED)


def _one_by_one(probabilities, output):
    one_by_one = [answers.answers([row], output, top_k=1)[0] for row in probabilities]
    return [a["label"] for a in one_by_one], [a["probability"] for a in one_by_one]


def test_multiclass_rows_and_ties(image_signature):
    output = image_signature["output"]
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(10), size=500).astype(np.float32)
    p[0] = 0.1  # all ten equal: the first label wins
    p[1, 3] = p[1, 7] = 0.45  # a tie for first place between two labels
    p[1, [i for i in range(10) if i not in (3, 7)]] = 0.0125
    labels, best = best_answers(p, output)
    assert (labels, best) == _one_by_one(p, output)
    assert labels[:2] == [output["labels"][0], output["labels"][3]]
    assert all(type(x) is float for x in best)


def test_binary_rows_on_both_sides_of_one_half(features_signature):
    output = features_signature["output"]
    p = np.array([[0.0], [0.25], [0.49999997], [0.5], [0.75], [1.0]], dtype=np.float32)
    labels, best = best_answers(p, output)
    assert (labels, best) == _one_by_one(p, output)
    assert labels == [output["labels"][0]] * 3 + [output["labels"][1]] * 3
    assert best[1] == 0.75


def test_empty_and_malformed_output(image_signature, features_signature):
    assert best_answers(np.zeros((0,), np.float32), image_signature["output"]) == [[], []]
    with pytest.raises(ValueError, match="non-finite probability"):
        best_answers(np.array([[0.5] * 9 + [np.nan]]), image_signature["output"])
    with pytest.raises(ValueError, match="returned 3 probabilities for 10 labels"):
        best_answers(np.ones((2, 3)) / 3, image_signature["output"])
    with pytest.raises(ValueError, match="returned 2 values per row, expected 1"):
        best_answers(np.ones((2, 2)) / 2, features_signature["output"])
