"""Realistic request bodies for the load test, from the committed fixtures, each with the
label the model must answer. Bodies are encoded by kiln.client (the one place for that)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from kiln import client as http

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
DIGITS = FIXTURES / "digits"
ROWS = FIXTURES / "breast_cancer" / "rows.json"
IMAGE_MODELS = ("lenet", "mlp", "rnn")
TABLE_MODELS = ("binary",)
MODELS = IMAGE_MODELS + TABLE_MODELS


@dataclass(frozen=True)
class Payload:
    body: bytes
    content_type: str
    label: str


def digit_files() -> list[tuple[Path, str]]:
    """The ten committed digit images and the digit each shows (its file name)."""
    return [(DIGITS / f"{d}.png", str(d)) for d in range(10)]


def feature_rows() -> list[tuple[list[float], str]]:
    return [(row["features"], row["label"]) for row in json.loads(ROWS.read_text())]


def rest_payloads(model: str) -> list[Payload]:
    """Bodies for POST /predictions/MODEL: PNG bytes, or a JSON list of 30 features."""
    if model in IMAGE_MODELS:
        return [Payload(*http.encode_file(path), label) for path, label in digit_files()]
    if model in TABLE_MODELS:
        return [Payload(*http.encode_json(row), label) for row, label in feature_rows()]
    raise ValueError(f"unknown model {model!r}; expected one of {', '.join(MODELS)}")


def oip_tensor(model: str, values: np.ndarray) -> dict:
    """A one-row KServe v2 request: [1, 28, 28] UINT8 pixels or [1, 30] FP64 features."""
    datatype = "UINT8" if model in IMAGE_MODELS else "FP64"
    shape = [1, *values.shape]
    data = values.ravel().tolist()
    return {"inputs": [{"name": "input", "shape": shape, "datatype": datatype, "data": data}]}


def oip_payloads(model: str) -> list[Payload]:
    """Bodies for POST /v2/models/MODEL/infer on the Open Inference Protocol port."""
    if model in IMAGE_MODELS:
        raw = [(np.asarray(Image.open(path), dtype=np.uint8), label)
               for path, label in digit_files()]
    elif model in TABLE_MODELS:
        raw = [(np.asarray(row, dtype=np.float64), label) for row, label in feature_rows()]
    else:
        raise ValueError(f"unknown model {model!r}; expected one of {', '.join(MODELS)}")
    return [Payload(*http.encode_json(oip_tensor(model, values)), label)
            for values, label in raw]


def rest_problem(answer, expected: str) -> str | None:
    """Why a /predictions answer (parsed JSON) is wrong, or None when it is right."""
    if not isinstance(answer, dict) or not {"label", "probability"} <= answer.keys():
        return f"expected a JSON object with label and probability, got {str(answer)[:80]}"
    if not isinstance(answer["probability"], float) or not 0 <= answer["probability"] <= 1:
        return f"probability {answer['probability']!r} is not in [0, 1]"
    if answer["label"] != expected:
        return f"label {answer['label']!r}, expected {expected!r}"
    return None


def oip_problem(answer, model: str, expected: str) -> str | None:
    """Why an OIP infer answer (parsed JSON) is wrong, or None when it is right."""
    if not isinstance(answer, dict) or answer.get("model_name") != model:
        return f"expected an answer for {model!r}, got {str(answer)[:80]}"
    outputs = {o.get("name"): o for o in answer.get("outputs", []) if isinstance(o, dict)}
    if set(outputs) != {"probabilities", "label"}:
        return f"outputs {sorted(outputs)}, expected label and probabilities"
    if outputs["label"].get("data") != [expected]:
        return f"label {outputs['label'].get('data')!r}, expected [{expected!r}]"
    return None
