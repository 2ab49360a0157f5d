"""kiln.handlers.kinds is the one place that knows the input kinds: each kind's facts, and no
other module dispatching on a kind's name."""

import inspect
import re
from pathlib import Path

import numpy as np
import pytest

from kiln.handlers import kinds, oip
from kiln.handlers.errors import BadInput

ROOT = Path(__file__).resolve().parents[2]
GREY = {"name": "x", "kind": "image", "dtype": "float32", "shape": [-1, 1, 32, 32],
        "channels": 1, "size": [28, 28], "pad": 2, "resize": "mnist", "pixel_max": 255,
        "mean": [0.1307], "std": [0.3081]}
RGB = {**GREY, "shape": [-1, 3, 8, 6], "channels": 3, "size": [8, 6], "pad": 0,
       "resize": "fit", "mean": [0.5] * 3, "std": [0.25] * 3}
TABLE = {"name": "t", "kind": "features", "dtype": "float32", "shape": [-1, 3],
         "names": ["a", "b", "c"], "mean": [0.0] * 3, "std": [1.0] * 3}
TOKENS = {"name": "ids", "kind": "tensor", "dtype": "int64", "shape": [-1, -1],
          "max_length": 8, "pad_value": 0, "min": 0, "max": 99}

# Comparisons of an input kind's name: a dispatch that belongs in kinds.py.
DISPATCH = re.compile(r"""(==|!=)\s*["'](image|features|tensor)["']"""
                      r"""|["'](image|features|tensor)["']\s*(==|!=)"""
                      r"""|["'](image|features|tensor)["']\.equals\(""")
# Files that may still name a kind, and why.
ALLOWED = {
    "handlers/kinds.py": "the kinds themselves",
    "loadtests/plain_handler.py": "the plain baseline a user writes imports no Kiln code",
    "loadtests/declared.py": "picks a model by its input kind's name",
    "loadtests/studies/reliability/served.py": "picks models by their input kind's name",
    "loadtests/studies/decode_cost.py": "a study of image decoding picks an image model",
}
SOURCES = ("batch", "deploy", "handlers", "kiln", "loadtests", "model_store", "training")


def test_no_module_but_kinds_dispatches_on_an_input_kind():
    found = []
    for folder in SOURCES:
        for path in sorted((ROOT / folder).rglob("*")):
            relative = path.relative_to(ROOT).as_posix()
            if path.suffix not in (".py", ".java") or relative in ALLOWED:
                continue
            found += [f"{relative}:{n}: {line.strip()}" for n, line in
                      enumerate(path.read_text().splitlines(), 1) if DISPATCH.search(line)]
    assert found == []


@pytest.mark.parametrize("spec,raw,graph,datatype,oip_rows", [
    (GREY, [28, 28], [-1, 1, 32, 32], "FP32", [[28, 28], [1, 28, 28]]),
    (RGB, [8, 6, 3], [-1, 3, 8, 6], "FP32", [[8, 6, 3]]),
    (TABLE, [3], [-1, 3], "FP32", [[3]]),
    (TOKENS, [-1], [-1, -1], "INT64", [[-1]]),
])
def test_each_kinds_shapes_and_datatype(spec, raw, graph, datatype, oip_rows):
    kind = kinds.of(spec)
    assert kind.raw_shape(spec) == raw
    assert kind.graph_shape({**spec, "shape": spec["shape"][1:]}) == graph
    assert kind.datatype(spec) == datatype
    assert kind.oip_row_shapes(spec) == oip_rows


def test_the_registry_names_each_kind_once_and_dispatches_by_name():
    assert kinds.NAMES == ("image", "features", "tensor")
    assert [type(kinds.of(s)) for s in (GREY, TABLE, TOKENS)] == [
        kinds.ImageKind, kinds.FeaturesKind, kinds.TensorKind]


def test_a_kind_implements_every_step_it_takes():
    """Adding a kind is one class: whatever it leaves to the base raises, so a kind that
    forgets a step is caught here, not by a request."""
    abstract = [name for name, member in vars(kinds.InputKind).items() if callable(member)
                and _raises_not_implemented(member)]
    assert abstract == ["declared", "check", "raw_shape", "graph_shape", "random_rows",
                        "row_from_json", "rows_from_raw", "npy_rows", "raw_from_json"]
    for kind in kinds.KINDS.values():
        missing = [name for name in abstract if getattr(type(kind), name) is
                   getattr(kinds.InputKind, name)
                   and not (name == "raw_from_json" and not kind.raw_table_rows)]
        assert (kind.name, missing) == (kind.name, [])


def _raises_not_implemented(function):
    return inspect.getsource(function).rstrip().endswith("raise NotImplementedError")


def test_only_an_image_input_takes_an_encoded_image():
    png = bytes.fromhex("89504e470d0a1a0a")
    with pytest.raises(BadInput, match="^this model takes features, not an image$"):
        kinds.of(TABLE).row_from_image(png, TABLE)
    with pytest.raises(BadInput, match="^input 'ids' takes an array, not an image$"):
        kinds.of(TOKENS).row_from_image(png, TOKENS)
    assert [k.takes_encoded_images for k in kinds.KINDS.values()] == [True, False, False]


def test_tensor_rows_of_several_lengths_join_padded():
    kind = kinds.of(TOKENS)
    joined = kind.join([np.array([[1, 2]]), np.array([[3, 4, 5]])], TOKENS)
    assert joined.tolist() == [[1, 2, 0], [3, 4, 5]]
    assert kinds.of(TABLE).empty(TABLE).shape == (0, 3)


def test_oip_metadata_inputs_come_from_the_kinds():
    signature = {"name": "m", "inputs": [GREY, TOKENS],
                 "output": {"kind": "regression", "name": "y", "names": ["v"]}}
    assert oip.model_metadata(signature, "1.0")["inputs"] == [
        {"name": "x", "datatype": "FP32", "shape": [-1, 28, 28]},
        {"name": "ids", "datatype": "INT64", "shape": [-1, -1]}]
