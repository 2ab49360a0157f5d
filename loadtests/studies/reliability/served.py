"""What is served: the models the parts use, their payloads, their workers."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import requests

from kiln import declaration
from kiln.deploy.server import Server
from kiln.loadtests import declared, payloads


class SetupError(RuntimeError):
    """The server cannot be measured as it is: what it serves, or none runs."""


@dataclass(frozen=True)
class Models:
    """The served models the parts use, by the kind of their one input (management order)."""

    served: list[str]
    image: list[str]
    features: list[str]

    @classmethod
    def of(cls, server: Server) -> Models:
        r = requests.get(f"{server.url('management')}/models", timeout=10,
                         headers={"Authorization": f"Bearer {server.keys()['management']}"})
        r.raise_for_status()
        served = [m["modelName"] for m in r.json()["models"]]
        kinds = {}
        for name in served:
            with contextlib.suppress(declaration.DeclarationError):
                kinds[name] = declared.input_kind(declaration.get(name))
        models = cls(served, [m for m in served if kinds.get(m) == "image"],
                     [m for m in served if kinds.get(m) == "features"])
        if len(models.image) < 2 or not models.features:
            raise SetupError(f"the server serves {', '.join(served) or 'nothing'}: these parts "
                             "need two image models and a features model (Kiln's default set)")
        return models


def rest_payload(name: str) -> payloads.Payload:
    return payloads.first_payload(declaration.get(name))


def oip_payload(name: str) -> payloads.Payload | None:
    found = payloads.oip_payloads(declaration.get(name))
    return found[0] if found else None


def worker_pids(server: Server, name: str) -> list[tuple[int, str]]:
    """(pid, status) of each worker the management API lists for `name`."""
    return [(int(w.get("pid", -1)), w.get("status", "")) for w in server.model_status(name)]
