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


class _StepClock:
    """A fake clock where a step takes `per_token[threads] * tokens` seconds."""

    def __init__(self, per_token):
        self.t, self.per_token, self.threads = 0.0, per_token, None

    def __call__(self):
        return self.t

    def run(self, tuner, tokens=64, steps=1):
        from_threads = []
        for _ in range(steps):
            tuner.before_step()
            self.t += self.per_token[self.threads] * tokens
            tuner.after_step(tokens)
            from_threads.append(self.threads)
        return from_threads


def _tuner(clock, **kw):
    from pagedserve.engine.thread_tuner import ThreadTuner

    def set_threads(n):
        clock.threads = n

    clock.threads = 2
    return ThreadTuner(2, set_threads, clock=clock, **kw)


def test_tuner_keeps_all_threads_on_a_quiet_cpu_and_backs_off_its_probes():
    """Quiet: two threads twice as fast. The first probe (after 2 s of stepping) alternates 2 and
    1 thread for 4 steps each and keeps 2; while the answer holds, the next ones come 30, 60, 120,
    120 s of stepping later."""
    clock = _StepClock({2: 0.001, 1: 0.002})  # 64 tokens: 64 ms on two threads
    tuner = _tuner(clock)
    assert set(clock.run(tuner, steps=32)) == {2}  # 2.05 s: no probe yet
    assert clock.run(tuner, steps=8) == [2, 1] * 4 and tuner.probes == 1 and tuner.chosen == 2
    ends = [clock.t]
    while tuner.probes < 5:
        before = tuner.probes
        clock.run(tuner)
        if tuner.probes > before:
            ends.append(clock.t)
    # between probe ends: the wait (doubling from 15 s, first doubled as probe 1 kept the choice)
    # plus a probe's 8 steps (4 x 64 ms + 4 x 128 ms)
    assert [round(b - a - 0.768) for a, b in zip(ends, ends[1:])] == [30, 60, 120, 120]  # +- a step
    assert tuner.chosen == 2


def test_tuner_moves_to_one_thread_when_the_cpu_is_shared_and_back_when_it_is_not():
    """Contended: one thread runs 1.5x as fast per token as two; the probe picks one (a margin
    below 1.15x would not), keeps it between probes, and returns to two once they win again."""
    clock = _StepClock({2: 0.003, 1: 0.002})
    tuner = _tuner(clock)
    clock.run(tuner, steps=20)  # past the first probe
    assert tuner.probes == 1 and tuner.chosen == 1 and set(clock.run(tuner, steps=50)) == {1}
    clock.per_token = {2: 0.0021, 1: 0.002}  # 2 threads only 5% slower: still not worth switching back
    while tuner.probes < 2:
        clock.run(tuner)
    assert tuner.chosen == 1
    clock.per_token = {2: 0.001, 1: 0.002}  # the neighbour left
    while tuner.probes < 3:
        clock.run(tuner)
    assert tuner.chosen == 2 and clock.run(tuner, steps=5) == [2] * 5
    empty = tuner.probes
    tuner._wait_s = 0
    for _ in range(10):  # steps without tokens (all requests waiting on grammars) do not count
        tuner.before_step()
        tuner.after_step(0)
    assert tuner.probes == empty


def test_engine_plans_work_for_all_threads_and_tunes_only_on_the_cpp_path(tiny_dirs):
    import torch

    from pagedserve import LLM

    n = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        llm = LLM(str(tiny_dirs["llama"]), kv_cache_memory=16 << 20)
        assert llm.engine.tuner is not None and llm.engine.tuner.threads == 2
        assert LLM(str(tiny_dirs["llama"]), kv_cache_memory=16 << 20, adaptive_threads=False).engine.tuner is None
        assert LLM(str(tiny_dirs["llama"]), kv_cache_memory=16 << 20, attention_backend="torch").engine.tuner is None
    finally:
        torch.set_num_threads(n)
