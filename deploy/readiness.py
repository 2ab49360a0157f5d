"""Whether a TorchServe is ready, asked of its management API: a worker of each model READY
(/ping says Healthy well before that)."""

from __future__ import annotations

import requests


def api_up(management_url: str, token: str) -> bool:
    """The management API answers with this token."""
    try:
        r = requests.get(f"{management_url}/models", timeout=5,
                         headers={"Authorization": f"Bearer {token}"})
    except OSError:  # no socket yet
        return False
    return r.status_code == 200


def workers(management_url: str, token: str, name: str) -> list[dict]:
    """The management API's workers of `name`."""
    r = requests.get(f"{management_url}/models/{name}", timeout=5,
                     headers={"Authorization": f"Bearer {token}"})
    r.raise_for_status()
    return r.json()[0].get("workers", [])


def models_ready(management_url: str, token: str, models: list[str]) -> dict[str, bool]:
    """Per model: has a worker loaded it?"""
    out = {}
    for name in models:
        try:
            listed = workers(management_url, token, name)
        except (requests.RequestException, OSError, ValueError, KeyError):
            out[name] = False
            continue
        out[name] = any(w.get("status") == "READY" for w in listed)
    return out
