"""The engine's CPU threads follow the container's limit (cgroup quota, affinity), not the node."""

import os
import subprocess
import sys

import pytest

from pagedserve.engine.cpu_threads import container_threads, cpu_quota


def test_cgroup_v2_and_v1_quotas(tmp_path):
    (tmp_path / "cpu.max").write_text("250000 100000\n")
    assert cpu_quota(tmp_path) == (2.5, str(tmp_path / "cpu.max"))
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cpu_quota(tmp_path) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("150000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu_quota(v1)[0] == 1.5
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpu_quota(v1) is None


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs to restrict to 1")
def test_limit_below_the_cpus_wins(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs: 1 thread, never 0
    n, why = container_threads(tmp_path)
    assert n == 1 and "CPU limit 1.5" in why
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    assert container_threads(tmp_path)[0] == 1


def test_engine_takes_the_affinity_of_a_taskset_process(tiny_dirs):
    """A process pinned to one CPU (what a cpuset does) runs one torch thread and says why."""
    code = ("import os, torch; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}); "
            "from pagedserve.config import EngineConfig; from pagedserve.engine.engine import LLMEngine; "
            f"e = LLMEngine(EngineConfig(model={str(tiny_dirs['llama'])!r}, kv_cache_memory=16 << 20)); "
            "print(torch.get_num_threads(), e.threads_why)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    n, why = r.stdout.strip().splitlines()[-1].split(" ", 1)
    assert n == "1" and "1 CPUs in this process's affinity" in why
