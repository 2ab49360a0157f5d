"""Pass/fail thresholds of a load test: given as flags or in a YAML/TOML file, evaluated on
locust's totals (in the locustfile's quitting listener, which sets the exit code)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import yaml


@dataclass(frozen=True)
class Thresholds:
    """None: no limit. Times in milliseconds, the failure ratio in [0, 1]."""

    max_fail_ratio: float | None = 0.01
    max_p95_ms: float | None = None
    max_p99_ms: float | None = None

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and not (isinstance(value, int | float) and value >= 0):
                raise ValueError(f"threshold {f.name} must be a number >= 0, got {value!r}")

    def merged(self, **overrides) -> Thresholds:
        """These thresholds with the overrides that are not None (flags over a file)."""
        given = {k: v for k, v in overrides.items() if v is not None}
        return Thresholds(**{**asdict(self), **given})


@dataclass(frozen=True)
class Check:
    name: str
    limit: str
    actual: float
    held: bool


def load(path: Path) -> Thresholds:
    """Thresholds from a .yaml/.yml or .toml file, at the top level or under `thresholds`."""
    text = path.read_text()
    if path.suffix == ".toml":
        import tomllib  # Python 3.11+; YAML works everywhere

        document = tomllib.loads(text)
    elif path.suffix in (".yaml", ".yml"):
        document = yaml.safe_load(text) or {}
    else:
        raise ValueError(f"{path}: thresholds file must end in .yaml, .yml or .toml")
    document = document.get("thresholds", document) if isinstance(document, dict) else None
    if not isinstance(document, dict):
        raise ValueError(f"{path}: expected a mapping of thresholds")
    known = {f.name for f in fields(Thresholds)}
    if unknown := set(document) - known:
        raise ValueError(f"{path}: unknown thresholds {sorted(unknown)}; known: {sorted(known)}")
    return Thresholds(**document)


def evaluate(t: Thresholds, requests: int, fail_ratio: float, p95_ms: float,
             p99_ms: float) -> list[Check]:
    """One check per limit, plus one that something was sent at all."""
    checks = [Check("requests", "> 0", requests, requests > 0)]
    for name, limit, actual in (("failure ratio", t.max_fail_ratio, fail_ratio),
                                ("p95 ms", t.max_p95_ms, p95_ms),
                                ("p99 ms", t.max_p99_ms, p99_ms)):
        if limit is not None:
            held = not math.isnan(actual) and actual <= limit
            checks.append(Check(name, f"<= {limit:g}", actual, held))
    return checks


def passed(checks: list[Check]) -> bool:
    return all(c.held for c in checks)
