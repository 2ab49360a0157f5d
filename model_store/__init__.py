"""Builds TorchServe model archives; the built .mar files live here too (git-ignored)."""
