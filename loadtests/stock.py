"""TorchServe without Kiln, for comparison: archives of the same TorchScript graph with
TorchServe's stock `base_handler`, and with a handler that answers a constant.

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

NOOP_HANDLER = Path(__file__).resolve().parent / "noop_handler.py"
STOCK_HANDLER = "base_handler"
DESCRIPTION = ("TorchServe's stock base_handler + json envelope, TorchScript, default "
               "settings (batch 1, one worker per core); body: the standardised input "
               "tensor as JSON {\"instances\": [...]}")


@dataclass
class StockSettings(ServerSettings):
    """Kiln's server settings plus TorchServe's json envelope, for stock handlers only; a
    model not listed in `serving` gets TorchServe's own defaults (it has no declaration)."""

    def model_serving(self, name: str) -> ModelServing | None:
        return self.serving.get(name)

    def config_properties(self) -> str:
        return super().config_properties() + "service_envelope=json\n"


def archive(name: str, version: str, handler: str, model_ts: Path, store: Path) -> Path:
    """store/NAME.mar around a TorchScript file (base_handler loads only *.pt), without a
    model-config.yaml: the server's settings apply."""
    with tempfile.TemporaryDirectory(prefix="kiln-stock-") as tmp:
        serialized = Path(tmp) / "model.pt"
        shutil.copyfile(model_ts, serialized)
        cmd = [str(Path(sys.executable).with_name("torch-model-archiver")),
               "--model-name", name, "--version", version,
               "--serialized-file", str(serialized), "--handler", handler,
               "--export-path", str(store), "--force"]
        done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"torch-model-archiver failed:\n{done.stdout}{done.stderr}")
    return store / f"{name}.mar"


def build_all(name: str, version: str, artifacts: Path, store: Path) -> dict[str, str]:
    """Row name -> archive name for the stock and no-op archives in `store` (`version`: the
    model's, as its Kiln archive has it)."""
    store.mkdir(parents=True, exist_ok=True)
    names = {"stock": f"{name}_stock", "noop": f"{name}_noop"}
    archive(names["stock"], version, STOCK_HANDLER, artifacts / "model.ts", store)
    archive(names["noop"], version, str(NOOP_HANDLER), artifacts / "model.ts", store)
    return names


def body(model_input) -> tuple[bytes, str]:
    """One standardised input (no batch dimension) as the json envelope wants it."""
    return http_client.encode_json({"instances": [model_input.tolist()]})
