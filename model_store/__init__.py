"""Builds TorchServe model archives; the built .mar files live here too (git-ignored)."""

from pathlib import Path

STORE = Path(__file__).resolve().parent
