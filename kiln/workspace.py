"""The workspace: the one folder everything a user's commands write goes under.

It is the current folder, or the one `KILN_WORKSPACE` names (`kiln --workspace DIR` sets it
for the command and whatever the command starts). Kiln's own repository is one workspace among
others. Nothing is ever written beside Kiln's code: an installed Kiln lives in site-packages.

Resolved when asked, never at import: the workspace is known only once the command line and
the environment have been read.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

ENV = "KILN_WORKSPACE"


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def current(cls) -> Workspace:
        """The one `KILN_WORKSPACE` names, else the current folder."""
        return cls(Path(os.environ.get(ENV) or Path.cwd()).resolve())

    @property
    def artifacts(self) -> Path:
        """Weights and exports, a folder per model (kiln train, kiln export)."""
        return self.root / "artifacts"

    def exports(self, name: str) -> Path:
        return self.artifacts / name

    @property
    def model_store(self) -> Path:
        """The built archives (kiln archive, kiln serve)."""
        return self.root / "model_store"

    @property
    def run(self) -> Path:
        """A server's config, logs, keys, ports and pid (kiln serve); load-test reports go
        under its loadtests/."""
        return self.root / "run"

    @property
    def tensorboard(self) -> Path:
        """Training logs (kiln train)."""
        return self.root / "runs"

    @property
    def tune(self) -> Path:
        """The tuner's report, trials and picked [serving] table (kiln tune)."""
        return self.root / "tune"


def add_run_dir(parser: argparse.ArgumentParser, what: str) -> None:
    """--run-dir, the same default in every command: the workspace's run/."""
    parser.add_argument("--run-dir", type=Path, default=Workspace.current().run,
                        help=f"{what} (default: the workspace's run/)")
