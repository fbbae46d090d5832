"""One thread or all of them: measured while the engine steps, for a CPU it may be sharing.

A decode step's threads meet after every kernel (~270 times a step). When another process takes
one of the cores (a busy neighbour, a sidecar, a CI job, a CPU quota spent early in its period),
the thread on that core runs in time slices and everyone else waits for it at each meeting: two
threads then deliver less than one (measured in benchmarks/cpu_contention.py). No load figure
says which side of that line a step is on, so the tuner measures: a probe runs a few steps
alternating between N threads and one (consecutive steps have nearly the same batch, so both
settings see the same work), and the faster per token is kept until the next probe (by a
margin, so noise does not flip it). Probes come soon after start, then at an interval that
doubles while the answer holds (a probe costs a few one-thread steps: ~0.2% of a quiet box's
throughput at the longest interval).

The kernels' results do not depend on the thread count that runs them (parallel.h), so a switch
changes speed only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger("pagedserve.engine")


@dataclass
class ThreadTuner:
    threads: int  # N: what the process may use (cpu_threads.container_threads or --num-threads)
    set_threads: Callable[[int], None]  # torch.set_num_threads, on the engine's thread
    first_probe_s: float = 2.0  # of stepping, before the first probe
    interval_s: float = 15.0  # after a probe that changed the choice; doubles while it holds
    max_interval_s: float = 120.0
    probe_steps: int = 4  # per setting
    margin: float = 1.15  # the other setting must be this much faster per token to switch
    clock: Callable[[], float] = time.monotonic
    chosen: int = field(init=False)
    probes: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.chosen = self.threads
        self._wait_s = self.first_probe_s  # stepping time until the next probe
        self._gap_s = self.interval_s
        self._probe: dict[int, list[float]] | None = None  # threads -> [tokens, seconds, steps]
        self._running = self.threads
        self._t0 = 0.0

    def before_step(self) -> None:
        if self._probe is None and self._wait_s <= 0:
            self._probe = {self.threads: [0, 0.0, 0], 1: [0, 0.0, 0]}
        n = self.chosen
        if self._probe is not None:  # alternate, N first
            done = self._probe[self.threads][2] + self._probe[1][2]
            n = self.threads if done % 2 == 0 else 1
        if n != self._running:
            self.set_threads(n)
            self._running = n
        self._t0 = self.clock()

    def after_step(self, tokens: int) -> None:
        dt = self.clock() - self._t0
        if self._probe is None:
            self._wait_s -= dt
            return
        if tokens <= 0:
            return
        slot = self._probe[self._running]
        slot[0] += tokens
        slot[1] += dt
        slot[2] += 1
        if self._probe[1][2] >= self.probe_steps:
            self._decide()

    def _decide(self) -> None:
        rate = {n: t / max(s, 1e-9) for n, (t, s, _) in self._probe.items()}
        self._probe = None
        self.probes += 1
        other = 1 if self.chosen == self.threads else self.threads
        new = other if rate[other] > self.margin * rate[self.chosen] else self.chosen  # no flapping on noise
        if new != self.chosen:
            log.info("CPU threads: %d of %d (a probe measured %.0f tokens/s on one thread, %.0f on %d%s)", new,
                     self.threads, rate[1], rate[self.threads], self.threads,
                     ": the CPU is shared" if new == 1 else "")
            self.chosen = new
            self._gap_s = self.interval_s
        else:
            self._gap_s = min(2 * self._gap_s, self.max_interval_s)
        self._wait_s = self._gap_s
