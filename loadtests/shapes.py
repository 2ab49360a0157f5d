"""The load profiles (constant, step, spike) as pure functions of time; the locustfile's
LoadTestShape classes ask them what to run at each tick."""

from __future__ import annotations

import math
from dataclasses import dataclass

SHAPES = ("constant", "step", "spike")
STEPS = 4
# spike: a quarter of the users, then all of them for the middle fifth, then a quarter again.
SPIKE_START, SPIKE_END = 0.4, 0.6


@dataclass(frozen=True)
class Profile:
    users: int
    spawn_rate: float
    duration: float


def constant(p: Profile, t: float) -> tuple[int, float] | None:
    return (p.users, p.spawn_rate) if t < p.duration else None


def step(p: Profile, t: float) -> tuple[int, float] | None:
    """STEPS equal steps up to p.users, each lasting a STEPS-th of the run."""
    if t >= p.duration:
        return None
    stage = min(STEPS, int(t / (p.duration / STEPS)) + 1)
    return max(1, math.ceil(p.users * stage / STEPS)), p.spawn_rate


def spike(p: Profile, t: float) -> tuple[int, float] | None:
    """A baseline, a sudden spike to p.users (spawned at once), the baseline again."""
    if t >= p.duration:
        return None
    baseline = max(1, p.users // 4)
    if SPIKE_START * p.duration <= t < SPIKE_END * p.duration:
        return p.users, max(p.spawn_rate, float(p.users))
    return baseline, max(p.spawn_rate, float(p.users))


PROFILES = {"constant": constant, "step": step, "spike": spike}


def users_at(shape: str, p: Profile, t: float) -> tuple[int, float] | None:
    """(users, spawn rate) at t seconds into the run, None when the run is over."""
    try:
        return PROFILES[shape](p, t)
    except KeyError:
        raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}") from None
