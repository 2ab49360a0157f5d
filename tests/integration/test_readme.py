"""The README's shell blocks, run in their order as a reader would type them, from the
repository, each block one `bash -euo pipefail` script.

A block is left out only by the HTML comment just above it: `<!-- not run by tests: WHY -->`,
or `<!-- not run by tests: WHY; they run instead: COMMAND -->` (the stand-in that makes the
next blocks' state: `make serve` installs and serves four models, so `kiln serve lenet`).
Two things differ from a reader's run, so that it never meets their server or files: the
workspace is a temporary folder (KILN_WORKSPACE), seeded with lenet's exports and archive from
the tests' workspace (which the run leaves as it was), and Kiln's ports are free ones:
`kiln serve` gets them as flags, and 127.0.0.1:<default> in a block becomes 127.0.0.1:<free>.
"""

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from kiln.deploy.server import Ports
from kiln.model_store.build import ensure_built
from kiln.workspace import Workspace

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
FENCE = re.compile(r"^```(?:bash|sh)\n(.*?)^```", re.S | re.M)
SKIP = re.compile(r"<!--[^>]*?not run by tests: (?P<why>[^>]*?)"
                  r"(?:; they run instead: (?P<instead>[^>]*?))?\s*-->\s*$")
BLOCK_TIMEOUT_S = 600


@dataclass
class Block:
    line: int  # of its opening fence in README.md
    script: str
    skipped: str | None  # why, when it is not run as written


def readme_blocks(text: str) -> list[Block]:
    """Every ```bash or ```sh block, in order; a skipped one runs its stand-in, if any."""
    blocks = []
    for fence in FENCE.finditer(text):
        line = text.count("\n", 0, fence.start()) + 1
        skip = SKIP.search(text[:fence.start()])  # anchored at its end: right above it
        if skip:
            blocks.append(Block(line, skip["instead"] or "", skip["why"]))
        else:
            blocks.append(Block(line, fence.group(1), None))
    return blocks


def on_free_ports(script: str, ports: Ports) -> str:
    defaults = vars(Ports())
    for api, port in vars(ports).items():
        script = script.replace(f"127.0.0.1:{defaults[api]}", f"127.0.0.1:{port}")
    flags = " ".join(f"--{api.replace('_', '-')}-port {port}" for api, port in vars(ports).items())
    return re.sub(r"\bkiln serve\b", f"kiln serve {flags}", script)


def seeded_workspace(folder: Path, source: Workspace) -> Path:
    """A workspace with lenet's exports and archive as `source` has them (built if missing),
    so that serving it builds nothing: copies keep their times, so they stay up to date."""
    mar = ensure_built("lenet", store=source.model_store)
    shutil.copytree(source.exports("lenet"), folder / "artifacts" / "lenet")
    (folder / "model_store").mkdir()
    shutil.copy2(mar, folder / "model_store")
    return folder


def bash(script: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)


def test_readme_shell_blocks_run_in_order(tmp_path):
    blocks = readme_blocks((REPO / "README.md").read_text())
    ports = Ports.free()
    source = Workspace.current()
    workspace = seeded_workspace(tmp_path / "workspace", source)
    before = (git_status(), (source.model_store / "lenet.mar").stat().st_mtime_ns)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "KILN_WORKSPACE": str(workspace)}
    env.pop("KILN_MODELS_DIR", None)
    try:
        for block in blocks:
            if not block.script:
                continue
            done = bash(on_free_ports(block.script, ports), env)
            assert done.returncode == 0, (f"README.md line {block.line}:\n{block.script}\n"
                                          f"{done.stdout}\n{done.stderr}")
    finally:
        bash(on_free_ports("kiln stop", ports), env)
    # Everything went to the temporary workspace: no tracked file, no source archive changed.
    assert (git_status(), (source.model_store / "lenet.mar").stat().st_mtime_ns) == before
    ran = [b for b in blocks if b.skipped is None]
    assert len(ran) >= 3
    assert all(b.skipped.strip() for b in blocks if b.skipped is not None)


def git_status() -> str:
    return subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True,
                          text=True, check=True).stdout


def test_a_block_is_skipped_only_by_the_comment_right_above_it():
    text = ("<!-- not run by tests: installs; they run instead: kiln serve lenet -->\n"
            "```bash\nmake serve\n```\n\n<!-- not run by tests: no docker -->\nsome words\n"
            "```bash\ndocker build .\n```\n<!-- not run by tests: no cluster -->\n"
            "```sh\nkubectl apply\n```\n```\nplain text\n```\n")
    assert readme_blocks(text) == [
        Block(2, "kiln serve lenet", "installs"),
        Block(8, "docker build .\n", None),
        Block(12, "", "no cluster"),
    ]
