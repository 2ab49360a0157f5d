"""The client of Kiln's admin route (kiln serve --admin-port): what the version commands send
with --admin-url. The key comes from KEY_ENV or a file only its owner may read, never from a
flag (a command line is visible to every user of the machine)."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

import requests

KEY_ENV = "KILN_ADMIN_KEY"
# A deploy exports, archives, registers and warms before it answers.
DEPLOY_TIMEOUT_S = 900
CALL_TIMEOUT_S = 60


class AdminError(RuntimeError):
    """The admin route refused or could not be reached; what it says is for the user."""


def read_key_file(path: Path) -> str:
    """The key a file holds, refused when anyone but its owner may read or change it."""
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise AdminError(f"{path} may be read or changed by others (mode {mode & 0o777:o}): "
                         f"chmod 600 {path}")
    key = path.read_text().strip()
    if not key:
        raise AdminError(f"{path} holds no key")
    return key


@dataclass(frozen=True)
class Admin:
    url: str
    key: str

    @classmethod
    def of(cls, args) -> Admin:
        """From --admin-url and --admin-key-file, else $KILN_ADMIN_KEY."""
        if args.admin_key_file is not None:
            key = read_key_file(args.admin_key_file)
        else:
            key = os.environ.get(KEY_ENV, "").strip()
            if not key:
                raise AdminError(f"--admin-url needs an admin key: set {KEY_ENV} or give "
                                 f"--admin-key-file (kiln keys --admin show prints it)")
        return cls(args.admin_url.rstrip("/"), key)

    def _call(self, method: str, path: str, body: dict | None = None,
              timeout: float = CALL_TIMEOUT_S) -> dict:
        try:
            r = requests.request(method, f"{self.url}{path}", json=body, timeout=timeout,
                                 headers={"Authorization": f"Bearer {self.key}"})
        except requests.RequestException as err:
            raise AdminError(f"the admin route at {self.url} did not answer: {err}") from None
        try:
            answer = r.json()
        except ValueError:
            answer = {"error": r.text[:200]}
        if r.status_code != 200:
            raise AdminError(f"the admin route refused it ({r.status_code}): "
                             f"{answer.get('error', answer)}")
        return answer

    def act(self, name: str, action: str, arguments: dict) -> str:
        """One action on model `name` (deploy/admin_service.py's ACTIONS); what it did."""
        given = {k: v for k, v in arguments.items() if v is not None}
        timeout = DEPLOY_TIMEOUT_S if action == "deploy" else CALL_TIMEOUT_S
        return self._call("POST", f"/models/{name}/{action}", given, timeout)["result"]

    def models(self) -> dict:
        return self._call("GET", "/models")
