"""One thread or all of them: measured while the engine steps, for a CPU it may be sharing.

A decode step's threads meet after every kernel (~270 times a step). When another process takes
one of the cores (a busy neighbour, a sidecar, a CI job, a CPU quota spent early in its period),
the thread on that core runs in time slices and everyone else waits for it at each meeting: two
threads then deliver less than one (measured in benchmarks/cpu_contention.py). No load figure
says which side of that line a step is on, so the tuner measures: a probe runs steps alternating
between N threads and one, and compares the time per token of neighbouring steps that carry about
the same number of tokens (a decode-only step beside a decode-only one; a step with a prompt's
chunk in it runs many more tokens per second and would make whichever setting drew it look fast),
and the faster per token is kept until the next probe (by a margin, so noise does not flip it).
A probe that finds too few comparable neighbours gives up and keeps the choice. Probes come soon
after start (once the KV cache is faulted in: that thread takes a core while it runs), then at an
interval that doubles while the answer holds (a probe costs a few one-thread steps: ~0.2% of a
quiet box's throughput at the longest interval).

The kernels' results do not depend on the thread count that runs them (parallel.h), so a switch
changes speed only.
"""

from __future__ import annotations

import logging
import statistics
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
    probe_steps: int = 4  # comparable pairs of neighbouring steps (one on N threads, one on 1) a probe needs
    max_probe_steps: int = 64  # steps a probe may take to find them, else it gives up
    similar: float = 0.25  # neighbours are comparable when their token counts differ by at most this fraction
    margin: float = 1.15  # the other setting must be this much faster per token to switch
    clock: Callable[[], float] = time.monotonic
    ready: Callable[[], bool] = lambda: True  # probes wait while this is False (the KV cache faulting in)
    chosen: int = field(init=False)
    probes: int = field(init=False, default=0)
    abandoned: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.chosen = self.threads
        self._wait_s = self.first_probe_s  # stepping time until the next probe
        self._gap_s = self.interval_s
        self._probe: _Probe | None = None
        self._running = self.threads
        self._t0 = 0.0

    def before_step(self) -> None:
        if self._probe is None and self._wait_s <= 0 and self.ready():
            self._probe = _Probe()
        n = self.chosen
        if self._probe is not None:  # alternate, N first: neighbours always differ
            n = self.threads if self._probe.steps % 2 == 0 else 1
        if n != self._running:
            self.set_threads(n)
            self._running = n
        self._t0 = self.clock()

    def after_step(self, tokens: int) -> None:
        dt = self.clock() - self._t0
        probe = self._probe
        if probe is None:
            self._wait_s -= dt
            return
        if tokens <= 0:
            return
        step = (self._running, tokens, dt)
        prev, probe.unpaired = probe.unpaired, step
        if prev is not None and abs(prev[1] - tokens) <= self.similar * max(prev[1], tokens):
            one, many = (prev, step) if prev[0] == 1 else (step, prev)
            probe.pairs.append((one, many))
            probe.unpaired = None
        probe.steps += 1
        if len(probe.pairs) >= self.probe_steps:
            self._decide(probe.pairs)
        elif probe.steps >= self.max_probe_steps:  # no comparable neighbours (steps of every size): keep the choice
            self._probe = None
            self.abandoned += 1
            self._wait_s = self._gap_s

    def _decide(self, pairs: list) -> None:
        # Per pair: seconds per token on one thread / on N threads (> 1: N is faster).
        n_faster = statistics.median((o[2] / o[1]) / max(m[2] / m[1], 1e-12) for o, m in pairs)
        self._probe = None
        self.probes += 1
        gain = n_faster if self.chosen == 1 else 1 / n_faster  # how much faster the other setting is
        new = (self.threads if self.chosen == 1 else 1) if gain > self.margin else self.chosen  # no flapping on noise
        if new != self.chosen:
            rate = {k: sum(p[i][1] for p in pairs) / max(sum(p[i][2] for p in pairs), 1e-9)  # tokens/s, paired steps
                    for i, k in ((0, 1), (1, self.threads))}
            log.info("CPU threads: %d of %d (a probe measured %.0f tokens/s on one thread, %.0f on %d in comparable "
                     "steps%s)", new, self.threads, rate[1], rate[self.threads], self.threads,
                     ": the CPU is shared" if new == 1 else "")
            self.chosen = new
            self._gap_s = self.interval_s
        else:
            self._gap_s = min(2 * self._gap_s, self.max_interval_s)
        self._wait_s = self._gap_s


@dataclass
class _Probe:
    steps: int = 0
    unpaired: tuple[int, int, float] | None = None  # (threads, tokens, seconds) of the last step, not yet paired
    pairs: list = field(default_factory=list)  # ((1, tokens, s), (N, tokens, s))
