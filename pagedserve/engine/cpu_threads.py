"""How many CPU threads the engine should run: what the container may use, not what the node has.

A pod with a 2-CPU limit on a 64-core node sees 64 cores; torch would start 64 threads, and the
CFS quota would throttle them all a few milliseconds into every 100 ms period (steps that take
10x longer, at random). The limit is the cgroup's CPU quota (v2 `cpu.max`, v1
`cpu.cfs_quota_us` / `cpu.cfs_period_us`) and the CPUs the process may run on (its affinity,
which a cpuset or `taskset` sets). Fractions round down: 2.5 CPUs run 2 threads, never 0.
"""

from __future__ import annotations

import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _own_cgroup_dirs(root: Path) -> list[Path]:
    """This process's cgroup directory (from /proc/self/cgroup), then the root: inside a
    container the namespace's root is the container's own cgroup."""
    dirs = []
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            parts = line.split(":", 2)
            if len(parts) == 3 and parts[2] not in ("", "/"):
                dirs.append(root / parts[2].lstrip("/"))
                if parts[1]:
                    dirs.append(root / parts[1].split(",")[0] / parts[2].lstrip("/"))
    except OSError:
        pass
    return dirs + [root, root / "cpu", root / "cpu,cpuacct"]


def cpu_quota(root: Path = CGROUP_ROOT) -> tuple[float, str] | None:
    """(CPUs the cgroup's quota allows, the file it came from), or None when unlimited."""
    for d in _own_cgroup_dirs(root):
        try:
            quota, period = (d / "cpu.max").read_text().split()[:2]
            if quota == "max":
                return None
            return int(quota) / int(period), str(d / "cpu.max")
        except (OSError, ValueError):
            pass
        try:
            quota = int((d / "cpu.cfs_quota_us").read_text())
            period = int((d / "cpu.cfs_period_us").read_text())
            if quota <= 0:
                return None
            return quota / period, str(d / "cpu.cfs_quota_us")
        except (OSError, ValueError):
            pass
    return None


def container_threads(root: Path = CGROUP_ROOT) -> tuple[int, str]:
    """(threads, why) for this process."""
    try:
        cpus = len(os.sched_getaffinity(0))
        why = f"{cpus} CPUs in this process's affinity"
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
        why = f"{cpus} CPUs"
    q = cpu_quota(root)
    if q is not None and int(q[0]) < cpus:
        return max(1, int(q[0])), f"CPU limit {q[0]:g} ({q[1]}), {why}"
    return max(1, cpus), why
