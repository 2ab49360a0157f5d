"""Request bodies for load tests and benchmarks: a model's declared examples, each with the
label the model must answer (or none: then any JSON object will do). Bodies are encoded by
kiln.client (the one place for that)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
from PIL import Image

from kiln import client as http
from kiln.declaration import Declaration, DeclarationError, Example
from kiln.handlers import kinds


@dataclass(frozen=True)
class Payload:
    body: bytes
    content_type: str
    label: str | None  # what the answer's label must be; None: any JSON object


def examples(decl: Declaration) -> tuple[Example, ...]:
    if not decl.examples:
        raise DeclarationError(f"{decl.path}: no [[examples]]; load tests and benchmarks send "
                               "a model its declared examples: add one")
    return decl.examples


def rest_payload(example: Example) -> Payload:
    """The body of POST /predictions/NAME for one example: its file as it is, or its value as
    JSON."""
    if example.file is not None:
        return Payload(*http.encode_file(example.file), example.expect)
    return Payload(*http.encode_json(example.value), example.expect)


def rest_payloads(decl: Declaration) -> list[Payload]:
    return [rest_payload(e) for e in examples(decl)]


def first_payload(decl: Declaration) -> Payload:
    """What a benchmark sends over and over: the model's first example."""
    return rest_payload(examples(decl)[0])


def oip_input(decl: Declaration) -> dict | None:
    """The one image or features input the OIP user can send raw; None for other models."""
    if len(decl.inputs) == 1 and kinds.of(decl.inputs[0]).raw_examples:
        return decl.inputs[0]
    return None


def raw_values(example: Example, spec: dict) -> np.ndarray:
    """An example as the raw array its request holds: pixels [H, W] or [H, W, C], or the
    features in the declared names' order (a JSON object's own order when names are not
    declared, as the recipe's example files are written)."""
    value = example.value
    if example.file is not None:
        suffix = example.file.suffix.lower()
        if suffix == ".npy":
            return np.load(example.file, allow_pickle=False)
        if suffix != ".json":
            with Image.open(example.file) as img:
                return np.asarray(img.convert("L" if spec.get("channels", 1) == 1 else "RGB"))
        value = json.loads(example.file.read_text())
    if isinstance(value, dict):
        value = [value[name] for name in spec.get("names") or value]
    return np.asarray(value, dtype=np.float64)


def oip_tensor(spec: dict, values: np.ndarray) -> dict:
    """A one-row KServe v2 request: whole pixels as UINT8, anything else as FP64."""
    pixels = (kinds.of(spec).pixels and values.size > 0
              and np.array_equal(values, np.round(values))
              and values.min() >= 0 and values.max() <= 255)
    datatype, dtype = ("UINT8", np.uint8) if pixels else ("FP64", np.float64)
    data = values.astype(dtype).ravel().tolist()
    return {"inputs": [{"name": spec["name"], "shape": [1, *values.shape],
                        "datatype": datatype, "data": data}]}


def oip_payloads(decl: Declaration) -> list[Payload]:
    """Bodies for POST /v2/models/NAME/infer on the Open Inference Protocol port; none for a
    model whose input is not one image or one set of features."""
    spec = oip_input(decl)
    if spec is None:
        return []
    return [Payload(*http.encode_json(oip_tensor(spec, raw_values(e, spec))), e.expect)
            for e in examples(decl)]


def rest_problem(answer, expected: str | None) -> str | None:
    """Why a /predictions answer (parsed JSON) is wrong, or None when it is right."""
    if not isinstance(answer, dict):
        return f"expected a JSON object, got {str(answer)[:80]}"
    if expected is None:
        return None
    if "label" not in answer:
        return f"expected a JSON object with a label, got {str(answer)[:80]}"
    probability = answer.get("probability", 0.0)
    if not isinstance(probability, float) or not 0 <= probability <= 1:
        return f"probability {probability!r} is not in [0, 1]"
    if answer["label"] != expected:
        return f"label {answer['label']!r}, expected {expected!r}"
    return None


def oip_problem(answer, model: str, expected: str | None) -> str | None:
    """Why an OIP infer answer (parsed JSON) is wrong, or None when it is right."""
    if not isinstance(answer, dict) or answer.get("model_name") != model:
        return f"expected an answer for {model!r}, got {str(answer)[:80]}"
    outputs = {o.get("name"): o for o in answer.get("outputs", []) if isinstance(o, dict)}
    if not outputs:
        return f"no outputs in {str(answer)[:80]}"
    if expected is None:
        return None
    if "label" not in outputs:
        return f"outputs {sorted(outputs)}, expected a label"
    if outputs["label"].get("data") != [expected]:
        return f"label {outputs['label'].get('data')!r}, expected [{expected!r}]"
    return None
