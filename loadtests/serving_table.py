"""Rewrite a declaration's [serving] table in place (what `kiln tune --write-declaration` does).

The standard library reads TOML but writes none, and a user's declaration has comments and an
order worth keeping. So only lines of the [serving] table change (a key's value is replaced,
its comment kept; a missing key is added at the end of the table; a missing table at the end
of the file), and the result must read back as the same document with only those keys
changed, or nothing is written.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import tomllib
from collections.abc import Mapping
from pathlib import Path

HEADER = re.compile(r"\s*\[\s*serving\s*\]\s*(#.*)?$")
ANY_HEADER = re.compile(r"\s*\[")  # [table] or [[array of tables]]


class TableError(ValueError):
    """The [serving] table cannot be rewritten safely; the message says what to do."""


def _value(value: int) -> str:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"[serving] values are whole numbers, got {value!r}")
    return str(value)


def table(values: Mapping[str, int]) -> str:
    """A [serving] table holding `values`, as TOML."""
    return "[serving]\n" + "".join(f"{k} = {_value(v)}\n" for k, v in values.items())


def _set_keys(body: list[str], values: Mapping[str, int]) -> list[str]:
    """The table's lines with each key of `values` set: in place when present, else appended
    after the table's last non-blank line."""
    body, missing = list(body), dict(values)
    for i, line in enumerate(body):
        for key in list(missing):
            found = re.match(rf"(\s*{re.escape(key)}\s*=\s*)[^\s#]+", line)
            if found:
                body[i] = found.group(1) + _value(missing.pop(key)) + line[found.end():]
    end = max((i + 1 for i, line in enumerate(body) if line.strip()), default=0)
    body[end:end] = [f"{k} = {_value(v)}\n" for k, v in missing.items()]
    return body


def rewrite_text(text: str, values: Mapping[str, int]) -> str:
    """`text` (a whole TOML file) with its [serving] table holding `values` too."""
    before = tomllib.loads(text)
    if text and not text.endswith("\n"):
        text += "\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if HEADER.match(line)), None)
    if start is None:
        if "serving" in before:
            raise TableError("serving is declared other than as a [serving] table (dotted "
                             "keys or an inline table): write it as a [serving] table first")
        blank = "" if not text or text.endswith("\n\n") else "\n"
        new = text + blank + table(values)
    else:
        end = next((i for i in range(start + 1, len(lines)) if ANY_HEADER.match(lines[i])),
                   len(lines))
        new = "".join([*lines[:start + 1], *_set_keys(lines[start + 1:end], values),
                       *lines[end:]])
    try:
        after = tomllib.loads(new)
    except tomllib.TOMLDecodeError as err:
        raise TableError(f"rewriting [serving] would break the file ({err}): set "
                         f"{dict(values)} by hand") from None
    if after != {**before, "serving": {**before.get("serving", {}), **values}}:
        raise TableError(f"rewriting [serving] would change more than it: set {dict(values)} "
                         "by hand")
    return new


def rewrite(path: Path, values: Mapping[str, int]) -> None:
    """Rewrite the file at `path` in place, atomically (a reader sees the old or the new)."""
    new = rewrite_text(path.read_text(), values)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(new)
        shutil.copymode(path, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
