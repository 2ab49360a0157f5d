"""kiln deploy's warm-up inputs: each one a body the served model's handler takes."""

import json

import numpy as np
import pytest

from kiln import declaration
from kiln.deploy import lifecycle
from kiln.handlers import inputs


@pytest.fixture
def binary_signature():
    names = [f"f{i}" for i in range(4)]
    return {"inputs": [{"name": "input", "kind": "features", "dtype": "float32",
                        "shape": [-1, 4], "names": names, "mean": [1.0, -2.0, 30.0, 0.5],
                        "std": [0.5, 1.0, 10.0, 0.1]}]}




def test_a_features_model_is_warmed_with_random_rows_within_its_ranges(binary_signature):
    decl = declaration.get("binary")  # one features input, names known only to the export
    bodies = lifecycle.warm_bodies(decl, binary_signature)
    spec = binary_signature["inputs"][0]
    randoms = bodies[len(decl.examples):]
    assert len(randoms) == lifecycle.RANDOM_INPUTS
    for body, ctype in randoms:
        assert ctype == "application/json"
        value = json.loads(body)
        assert list(value) == spec["names"]
        row = inputs.row_from_json(value, spec)  # what the handler does with the body
        # Within the training distribution's +-3 std, standardised as the handler does.
        assert row.shape == (4,) and np.all(np.abs(row) <= 3 + 1e-6)


def test_without_its_signature_a_features_model_is_warmed_with_its_examples():
    """Was: KeyError 'names' (the declaration's features spec names no features)."""
    decl = declaration.get("binary")
    assert lifecycle.warm_bodies(decl) == [(e.body(), "application/json") for e in decl.examples]
