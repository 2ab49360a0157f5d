"""Cores as the process may use them: affinity and the cgroup's CPU quota, v2 and v1."""

import pytest

from kiln.handlers.cores import cgroup_quota, usable_cores


def cgroup_v2(tmp_path, cpu_max, path="/", parent_cpu_max=None):
    """A fake /sys/fs/cgroup (v2) and /proc/self/cgroup for a process in `path`."""
    root = tmp_path / "cgroup"
    own = root / path.strip("/")
    own.mkdir(parents=True, exist_ok=True)
    if cpu_max is not None:
        (own / "cpu.max").write_text(cpu_max + "\n")
    if parent_cpu_max is not None:
        (root / "cpu.max").write_text(parent_cpu_max + "\n")
    proc = tmp_path / "proc_cgroup"
    proc.write_text(f"0::{path}\n")
    return root, proc


@pytest.mark.parametrize("cpu_max,affinity,expected", [
    ("max 100000", 8, 8),        # no quota: the affinity
    ("200000 100000", 8, 2),     # docker --cpus 2 on an 8-CPU host
    ("150000 100000", 8, 2),     # --cpus 1.5: rounded up
    ("50000 100000", 8, 1),      # half a core is still one worker's
    ("400000 100000", 3, 3),     # taskset to 3 CPUs under a 4-core quota
    (None, 4, 4),                # no cpu controller file at all
    ("junk", 4, 4),
])
def test_cgroup_v2_quota_and_affinity(tmp_path, cpu_max, affinity, expected):
    root, proc = cgroup_v2(tmp_path, cpu_max)
    assert usable_cores(root, proc, affinity=affinity) == expected


def test_the_tightest_quota_on_the_way_up_counts(tmp_path):
    root, proc = cgroup_v2(tmp_path, "max 100000", path="/kubepods/pod1",
                           parent_cpu_max="300000 100000")
    assert cgroup_quota(root, proc) == 3.0
    assert usable_cores(root, proc, affinity=16) == 3


def test_cgroup_v1_cfs_quota(tmp_path):
    root = tmp_path / "cgroup"
    cpu = root / "cpu,cpuacct" / "docker" / "abc"
    cpu.mkdir(parents=True)
    (cpu / "cpu.cfs_quota_us").write_text("250000\n")
    (cpu / "cpu.cfs_period_us").write_text("100000\n")
    proc = tmp_path / "proc_cgroup"
    proc.write_text("12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n")
    assert cgroup_quota(root, proc) == 2.5
    assert usable_cores(root, proc, affinity=8) == 3


def test_cgroup_v1_unlimited_is_the_affinity(tmp_path):
    root = tmp_path / "cgroup"
    (root / "cpu").mkdir(parents=True)
    (root / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (root / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    proc = tmp_path / "proc_cgroup"
    proc.write_text("1:cpu:/\n")
    assert cgroup_quota(root, proc) is None
    assert usable_cores(root, proc, affinity=2) == 2


def test_no_cgroup_file_is_no_quota(tmp_path):
    assert cgroup_quota(tmp_path, tmp_path / "missing") is None
    assert usable_cores(tmp_path, tmp_path / "missing", affinity=5) == 5


def test_this_machine_has_at_least_one():
    assert usable_cores() >= 1
