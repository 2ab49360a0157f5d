"""The handler modules (handlers/kiln_codecs.py, kiln_backends.py), imported by the flat names
TorchServe gives them, so that batch jobs decode and answer exactly as the server does."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

HANDLERS_DIR = Path(__file__).resolve().parent.parent / "handlers"


def _module(name: str):
    if str(HANDLERS_DIR) not in sys.path:
        sys.path.insert(0, str(HANDLERS_DIR))
    return importlib.import_module(name)


def codecs():
    """handlers/kiln_codecs.py: decode_request, rows_from_raw, encode_answer, BadInput."""
    return _module("kiln_codecs")


def backends():
    """handlers/kiln_backends.py: load_backend."""
    return _module("kiln_backends")
