"""TorchServe archives of the benchmark's own, for comparison with Kiln's: the same model with
TorchServe's stock `base_handler` (TorchScript), with the plain handler a user would write
(loadtests/plain_handler.py, the same ONNX file Kiln serves), and with a handler that answers a
constant (loadtests/noop_handler.py).

TorchServe's image handlers (`image_classifier`, `vision_handler`) import torchvision and
captum, which Kiln does not install, and resize every image to ImageNet's 224x224 with three
channels. `base_handler` reads no body of its own (it calls torch.as_tensor on TorchServe's
request dicts); with TorchServe's `json` service envelope it takes
`{"instances": [tensor, ...]}`. So the stock server gets `service_envelope=json` and the
model's input tensor, already standardised by the client, as JSON.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kiln import client as http_client
from kiln.deploy.server import ModelServing, ServerSettings

HERE = Path(__file__).resolve().parent
NOOP_HANDLER = HERE / "noop_handler.py"
PLAIN_HANDLER = HERE / "plain_handler.py"
STOCK_HANDLER = "base_handler"
DESCRIPTION = ("TorchServe base_handler, TorchScript, TorchServe defaults: not a set-up anyone "
               "would pick (batch 1, one worker per core, json envelope; body: the input "
               "tensor, standardised by the client, as JSON {\"instances\": [...]})")


@dataclass
class BenchSettings(ServerSettings):
    """Kiln's server settings for the benchmark's servers: a model gets the workers and
    batching `serving` lists for it, else TorchServe's own defaults (the benchmark's archives
    have no declaration); TorchServe uses `gpus` GPUs (0: a CPU row stays one on a GPU host);
    `envelope`: TorchServe's service envelope (`json` for the stock handler only)."""

    gpus: int = 0
    envelope: str | None = None

    def model_serving(self, name: str) -> ModelServing | None:
        return self.serving.get(name)

    def config_properties(self) -> str:
        extra = f"number_of_gpu={self.gpus}\n"
        if self.envelope:
            extra += f"service_envelope={self.envelope}\n"
        return super().config_properties() + extra


def archive(name: str, version: str, handler: str, serialized: Path, store: Path,
            extra_files: tuple[Path, ...] = ()) -> Path:
    """store/NAME.mar around one model file, without a model-config.yaml: the server's
    settings apply."""
    cmd = [str(Path(sys.executable).with_name("torch-model-archiver")),
           "--model-name", name, "--version", version, "--serialized-file", str(serialized),
           "--handler", handler, "--export-path", str(store), "--force"]
    if extra_files:
        cmd += ["--extra-files", ",".join(map(str, extra_files))]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"torch-model-archiver failed:\n{done.stdout}{done.stderr}")
    return store / f"{name}.mar"


def build_stock(name: str, version: str, artifacts: Path, store: Path) -> str:
    """The stock archive's model name (`version`: the model's, as its Kiln archive has it)."""
    with tempfile.TemporaryDirectory(prefix="kiln-stock-") as tmp:
        serialized = Path(tmp) / "model.pt"  # base_handler loads only *.pt
        shutil.copyfile(artifacts / "model.ts", serialized)
        archive(f"{name}_stock", version, STOCK_HANDLER, serialized, store)
    return f"{name}_stock"


def build_plain(name: str, version: str, artifacts: Path, store: Path) -> str:
    archive(f"{name}_plain", version, str(PLAIN_HANDLER), artifacts / "model.onnx", store,
            (artifacts / "signature.json",))
    return f"{name}_plain"


def build_noop(name: str, version: str, artifacts: Path, store: Path, tag: str) -> str:
    """A no-op archive named for the configuration `tag` it will be served with (TorchServe
    serves one configuration per model name)."""
    archive(f"{name}_noop_{tag}", version, str(NOOP_HANDLER), artifacts / "model.onnx", store)
    return f"{name}_noop_{tag}"


def body(model_input) -> tuple[bytes, str]:
    """One standardised input (no batch dimension) as the json envelope wants it."""
    return http_client.encode_json({"instances": [model_input.tolist()]})
