"""The handler a competent user writes for an ONNX classifier in about thirty lines: the
"plain" row of `kiln bench`. PIL decodes (or JSON for features), numpy standardises with the
model's mean and std and pads as it was trained, one ONNX Runtime call per batch, and each
request gets {label, probability}. No limits, no metrics, no 400s of its own: a bad request
fails its whole batch. Its archive carries model.onnx and signature.json (for the numbers)."""

import io
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image


class PlainHandler:
    def initialize(self, context):
        model_dir = Path(context.system_properties["model_dir"])
        signature = json.loads((model_dir / "signature.json").read_text())
        self.spec, self.output = signature["inputs"][0], signature["output"]
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # one worker per core: no thread pool to fight over
        self.session = ort.InferenceSession(str(model_dir / "model.onnx"), options,
                                            providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.initialized = True

    def preprocess(self, body):
        spec = self.spec
        if spec["kind"] == "image":
            height, width = spec["size"]
            img = Image.open(io.BytesIO(body)).convert("L").resize((width, height))
            x = np.pad(np.asarray(img, dtype=np.float32) / 255, spec.get("pad", 0))
        else:  # features: TorchServe has parsed a JSON body already
            values = json.loads(body) if isinstance(body, (bytes, bytearray)) else body
            if isinstance(values, dict):
                values = [values[name] for name in spec["names"]]
            x = np.asarray(values, dtype=np.float32)
        x = (x - np.float32(spec["mean"])) / np.float32(spec["std"])
        return x.reshape(spec["shape"][1:])

    def answer(self, probabilities):
        labels = self.output["labels"]
        if self.output["kind"] == "binary":
            p = float(probabilities[0])
            positive = p >= self.output.get("threshold", 0.5)
            return {"label": labels[positive], "probability": p if positive else 1 - p}
        best = int(probabilities.argmax())
        return {"label": labels[best], "probability": float(probabilities[best])}

    def handle(self, data, context):
        batch = np.stack([self.preprocess(row.get("data") or row.get("body")) for row in data])
        (probabilities,) = self.session.run(None, {self.input_name: batch})
        return [self.answer(p) for p in probabilities]
