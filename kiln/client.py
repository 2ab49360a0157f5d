"""The HTTP client that `kiln predict` (and later the batch jobs and load tests) share.

The payload encoding lives here and only here: a file becomes a request body by its suffix.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import requests

from kiln.keys import KEYS_FILE, KeyFile

CONTENT_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".json": "application/json",
    ".npy": "application/x-npy",
}


def encode_file(path: Path) -> tuple[bytes, str]:
    """(body, content type) for a file a user wants scored."""
    content_type = CONTENT_TYPES.get(path.suffix.lower())
    if content_type is None:
        raise ValueError(f"{path}: unsupported file type {path.suffix!r}; "
                         f"use one of {', '.join(CONTENT_TYPES)}")
    return path.read_bytes(), content_type


def encode_json(value) -> tuple[bytes, str]:
    return json.dumps(value).encode(), "application/json"


def encode_image(raw: bytes) -> tuple[bytes, str]:
    """An image's bytes as a body of its own; the content type follows the bytes' magic."""
    content_type = "image/jpeg" if raw.startswith(b"\xff\xd8\xff") else "image/png"
    return raw, content_type


def encode_images(raws: list[bytes]) -> tuple[bytes, str]:
    """Several images in one body: {"instances": [{"b64": ...}, ...]}."""
    instances = [{"b64": base64.b64encode(raw).decode("ascii")} for raw in raws]
    return encode_json({"instances": instances})


def encode_inputs(values: dict) -> tuple[bytes, str]:
    """One instance of a model with several inputs, as the JSON object keyed by input name
    that the handler takes; an encoded image's bytes go as {"b64": ...}."""
    return encode_json({name: _json_input(value) for name, value in values.items()})


def _json_input(value):
    if isinstance(value, bytes):
        return {"b64": base64.b64encode(value).decode("ascii")}
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def encode_npy(array: np.ndarray) -> tuple[bytes, str]:
    """Raw values ([N, H, W] pixels or [N, F] features) as a .npy body: float32 when that
    holds every value exactly (pixels do), else float64."""
    values = np.asarray(array, dtype=np.float64)
    compact = values.astype(np.float32)
    buffer = io.BytesIO()
    np.save(buffer, compact if np.array_equal(compact, values) else values,
            allow_pickle=False)
    return buffer.getvalue(), CONTENT_TYPES[".npy"]


# The --token help of every command that sends requests: what read_token reads.
TOKEN_HELP = ("key sent as the Bearer token (default: the newest of the front proxy's keys in "
              "--run-dir, as kiln keys show prints it; TorchServe's own inference token in "
              "key_file.json for a server without Kiln's front proxy)")


def read_token(run_dir: Path, kind: str = "inference") -> str | None:
    """What a client of the server run from `run_dir` sends: for inference the newest key of
    its front proxy (run/keys), else (a server without one) the token TorchServe wrote."""
    if kind == "inference":
        key = KeyFile(run_dir / KEYS_FILE)()
        if key is not None:
            return key
    try:
        return json.loads((run_dir / "key_file.json").read_text())[kind]["key"]
    except (OSError, ValueError, KeyError):
        return None


@dataclass
class Answer:
    status: int
    body: dict | list | str
    # What the server said beside the body (kiln.grpc_client reads them from the answer's
    # metadata): the version that answered, and the shadow versions that also scored the
    # request (comma separated). Not part of what an answer is: equal answers may differ here.
    version: str | None = field(default=None, compare=False)
    shadowed: str | None = field(default=None, compare=False)

    @property
    def ok(self) -> bool:
        return self.status == 200


class Client:
    """`token`: a key, or a callable giving the key to send now (KeyFile)."""

    def __init__(self, base_url: str, token: str | Callable[[], str | None] | None = None,
                 timeout: float = 30, session: requests.Session | None = None):
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.session = session or requests.Session()

    def _headers(self, content_type: str | None = None) -> dict[str, str]:
        headers = {}
        token = self.token() if callable(self.token) else self.token
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    def predict(self, name: str, body: bytes, content_type: str) -> Answer:
        url = f"{self.base_url}/predictions/{name}"
        try:
            r = self.session.post(url, data=body, headers=self._headers(content_type),
                                  timeout=self.timeout)
        except requests.ConnectionError:
            # A kept-alive connection the server closed as this request went out (nginx
            # closes idle ones when it reloads keys): a prediction is safe to send again.
            r = self.session.post(url, data=body, headers=self._headers(content_type),
                                  timeout=self.timeout)
        try:
            payload = r.json()
        except ValueError:
            payload = r.text
        return Answer(r.status_code, payload)

    def predict_file(self, name: str, path: Path) -> Answer:
        return self.predict(name, *encode_file(path))

    def predict_json(self, name: str, value) -> Answer:
        return self.predict(name, *encode_json(value))

    def predict_inputs(self, name: str, values: dict) -> Answer:
        """One instance of a model with several inputs, {input name: value}."""
        return self.predict(name, *encode_inputs(values))
