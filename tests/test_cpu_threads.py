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


def test_tuner_compares_like_steps_not_a_prompt_chunk_against_decodes():
    """A server's steps differ in size: a step carrying a prompt's chunk runs many more tokens per
    second than a decode-only one. Two threads are faster for both kinds here, but the probe's
    one-thread slots keep drawing the prompt steps: summed over the probe, one thread would look
    1.6x faster (the trap a server fell into, measuring 816 tokens/s on one thread against 371 on
    two). Neighbouring steps of about the same size are compared instead, so two stay; and a probe
    with no comparable neighbours gives up rather than guess."""
    from pagedserve.engine.thread_tuner import ThreadTuner

    cost = {2: (0.008, 0.0005), 1: (0.012, 0.0009)}  # (per step, per token) seconds

    class Clock:
        t = 0.0
        threads = 2

        def __call__(self):
            return self.t

    clock = Clock()

    def set_threads(n):
        clock.threads = n

    tuner = ThreadTuner(2, set_threads, clock=clock)
    seen = {1: [0, 0.0], 2: [0, 0.0]}

    def step(tokens):
        tuner.before_step()
        dt = cost[clock.threads][0] + cost[clock.threads][1] * tokens
        clock.t += dt
        if tuner._probe is not None:
            seen[clock.threads][0] += tokens
            seen[clock.threads][1] += dt
        tuner.after_step(tokens)

    for _ in range(200):  # past the first probe
        step(8)
    assert tuner.probes == 1 and tuner.chosen == 2
    seen = {1: [0, 0.0], 2: [0, 0.0]}
    tuner._wait_s = 0
    pattern = [8, 512, 8, 8]  # probe slots 2, 1, 2, 1: the prompt steps land on one thread
    i = 0
    while tuner.probes < 2:
        step(pattern[i % 4])
        i += 1
    assert seen[1][0] / seen[1][1] > 1.5 * seen[2][0] / seen[2][1]  # the sum over the probe says "one thread"
    assert tuner.chosen == 2 and tuner.abandoned == 0
    tuner._wait_s = 0
    i = 0
    while tuner._probe is not None or i == 0:  # every neighbour differs in size: no comparison, no switch
        step([8, 512][i % 2])
        i += 1
    assert tuner.abandoned == 1 and tuner.probes == 2 and tuner.chosen == 2 and i == tuner.max_probe_steps


def test_tuner_waits_for_the_kv_cache_to_be_faulted_in():
    """The thread faulting the KV cache in takes a core for a few seconds after start: a probe then
    would measure our own start-up, not a neighbour. It waits until that is done."""
    busy = [True]
    clock = _StepClock({2: 0.001, 1: 0.002})
    tuner = _tuner(clock, ready=lambda: not busy[0])
    assert set(clock.run(tuner, steps=100)) == {2} and tuner.probes == 0  # 6.4 s of steps: no probe while busy
    busy[0] = False
    assert clock.run(tuner, steps=8) == [2, 1] * 4 and tuner.probes == 1


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
