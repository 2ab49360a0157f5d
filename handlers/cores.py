"""How many cores this process may really use: the fewest of its CPU affinity and its cgroup's
CPU quota (a container's `--cpus`), never os.cpu_count() alone, which counts the host's.

Here, not in deploy/, because both sides need the same answer: `kiln serve` sizes workers by
it, and a worker sizes its intra-op threads by it.
"""

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def usable_cores(cgroup_root=CGROUP_ROOT, proc_cgroup=PROC_CGROUP, affinity=None):
    """Whole cores, at least 1: a quota of 1.5 cores rounds up (half a core is still worth
    a worker's share of the time), an affinity of 3 CPUs is 3."""
    if affinity is None:
        affinity = _affinity()
    quota = cgroup_quota(cgroup_root, proc_cgroup)
    cores = affinity if quota is None else min(affinity, math.ceil(quota))
    return max(1, cores)


def _affinity():
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def cgroup_quota(cgroup_root=CGROUP_ROOT, proc_cgroup=PROC_CGROUP):
    """Cores' worth of CPU time the cgroup allows (2.5 for 250 ms per 100 ms), the tightest
    along the way from this process's cgroup up to the root; None when unlimited or unknown."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    quotas = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2: one hierarchy, cpu.max "QUOTA PERIOD" or "max ..."
            quotas += _along(cgroup_root, path, _v2)
        elif "cpu" in controllers.split(","):  # cgroup v1: cfs_quota_us -1 is unlimited
            for mount in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
                quotas += _along(cgroup_root / mount, path, _v1)
    return min(quotas) if quotas else None


def _along(mount, path, read):
    """The quotas set from `path` up to the mount's root (inside a container's cgroup
    namespace the path is "/" and the limit sits in the root's own file)."""
    found, parts = [], [p for p in path.split("/") if p]
    for depth in range(len(parts), -1, -1):
        quota = read(mount.joinpath(*parts[:depth]))
        if quota is not None:
            found.append(quota)
    return found


def _v2(folder):
    try:
        quota, period = (folder / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError, ZeroDivisionError):
        return None


def _v1(folder):
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None
