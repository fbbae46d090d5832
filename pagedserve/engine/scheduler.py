"""Continuous (iteration-level) batching.

Each step decides how many tokens every request computes: `{request_id: num_tokens}`.
There is no prefill/decode phase: a request simply has tokens it has not computed yet (a whole
prompt, a chunk of one, or the one token sampled last step), so prefill chunks and decodes share
a step under one token budget. Requests run in (priority, arrival) order; when KV blocks run
out, the lowest-priority running request is preempted: its blocks are freed and it is recomputed
later (its prefix blocks usually survive in the prefix cache).

Running requests go first, so a new prompt waits behind the decodes of a full batch. With a TTFT
target (`--ttft-target-ms`), a prompt that has waited that long goes ahead instead: for that step
the running requests still in their prompt (and those of better priority) run, then the waiting
prompts are admitted, and the other decodes take what budget is left, without preempting anyone
(a decode that finds no free block just waits a step) — unless the prompts could not be given
anything (no free blocks), when the step is an ordinary one. Decodes pause for a step or two; the
prompts of a burst reach their first token at prefill speed instead of behind every decode.

Background requests (priority >= the background policy's, batch lines) beside foreground ones
step only up to the policy's share, their prompts a few tokens a step (background.py).
"""

from __future__ import annotations

import bisect
import heapq
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pagedserve.engine.background import BackgroundPolicy
from pagedserve.engine.kv_cache import KVCacheManager
from pagedserve.engine.request import Request, RequestStatus


@dataclass
class SchedulerOutput:
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)  # same order as the dict
    preempted: list[Request] = field(default_factory=list)
    grammar_failed: list[Request] = field(default_factory=list)  # taken off the queue: their grammar did not compile

    @property
    def total_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int,
                 ttft_target_s: float | None = None, clock: Callable[[], float] = time.monotonic,
                 background: BackgroundPolicy | None = None):
        self.kv = kv
        self.background = background  # None: priorities only order requests (background.py)
        self._bg_seats: int | None = None  # this step: background sequences that may still step (run or admitted)
        self._bg_prefill: int | None = None  # this step: background prompt tokens left
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.ttft_target_s = ttft_target_s  # None: running requests always go first
        self.clock = clock  # the clock of Request.arrival_time
        self.num_prompt_first_steps = 0
        self.waiting: list[tuple[tuple, Request]] = []  # heap by sort_key
        self.running: list[Request] = []  # sorted by sort_key: the tail is preempted first
        self.num_preemptions = 0

    def add(self, req: Request) -> None:
        req.status = RequestStatus.WAITING
        heapq.heappush(self.waiting, (req.sort_key, req))

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        self._limit_background()
        late = self._overdue_prompt()
        if late is not None:
            self.num_prompt_first_steps += 1
            first = [r for r in self.running if r.num_sampled_tokens == 0 or r.priority < late.priority]
            budget = self._run(first, out, budget, preempt=True)
            budget = self._admit(out, budget)
            # Decodes take what is left. They preempt no one, unless the prompts got nothing (no
            # blocks for them either): then this is an ordinary step, or nothing would ever run.
            self._run([r for r in self.running if r.request_id not in out.num_scheduled_tokens], out, budget,
                      preempt=not out.requests)
        else:
            budget = self._run(list(self.running), out, budget, preempt=True)
            self._admit(out, budget)
        return out

    def _limit_background(self) -> None:
        """This step's room for background requests (background.py): unlimited without foreground."""
        self._bg_seats = self._bg_prefill = None
        bg = self.background
        if bg is None:
            return
        fg_running = sum(1 for r in self.running if not bg.is_background(r.priority))
        fg_waiting = bool(self.waiting) and not bg.is_background(self.waiting[0][1].priority)  # heap: best first
        if fg_running == 0 and not fg_waiting:
            return
        self._bg_seats = bg.seq_limit(max(fg_running, 1))
        self._bg_prefill = bg.prefill_tokens

    def _background_tokens(self, req: Request, n: int) -> int:
        """`n` capped by what background prompts (or a preempted request's recompute: more than one
        token to compute) may still take this step."""
        if self._bg_prefill is None or n <= 1 or not self.background.is_background(req.priority):
            return n
        n = min(n, self._bg_prefill)
        self._bg_prefill -= n
        return n

    def _overdue_prompt(self) -> Request | None:
        """A prompt (no token yet) that has waited the TTFT target and can go ahead now: running
        (a chunked prompt), or next to be admitted with a free sequence slot and its grammar ready."""
        if self.ttft_target_s is None:
            return None
        deadline = self.clock() - self.ttft_target_s
        for r in self.running:
            if r.num_sampled_tokens == 0 and r.arrival_time <= deadline:
                return r
        if self.waiting and len(self.running) < self.max_num_seqs:
            r = self.waiting[0][1]
            if r.num_output_tokens == 0 and r.arrival_time <= deadline and (r.grammar is None or r.grammar.ready()):
                return r
        return None

    def _run(self, reqs: list[Request], out: SchedulerOutput, budget: int, preempt: bool) -> int:
        """Schedule running requests in order: each its uncomputed tokens, as budget allows. When
        blocks run out, preempt from the tail of the running list, or (preempt=False) skip it."""
        for req in reqs:
            if budget == 0:
                break
            if req.status is not RequestStatus.RUNNING:  # preempted earlier in this loop
                continue
            background = self._bg_seats is not None and self.background.is_background(req.priority)
            if background and self._bg_seats == 0:
                continue  # past the background share: paused this step, its KV kept (oldest lines go on)
            if req.num_inflight and req.num_sampled_tokens >= req.max_tokens:
                continue  # its token in flight is its last (async scheduling): nothing more to compute
            n = self._background_tokens(req, min(req.num_planned_tokens - req.num_computed_tokens, budget))
            if n == 0:  # a background prompt past this step's share: it goes on next step
                continue
            while not self.kv.allocate_slots(req, n):
                if not preempt:
                    n = 0
                    break
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is req:
                    n = 0
                    break
            if n:
                self._add_to_output(out, req, n)
                budget -= n
                if background:
                    self._bg_seats -= 1
        return budget

    def _admit(self, out: SchedulerOutput, budget: int) -> int:
        """Admit waiting requests while budget, sequence slots and blocks allow. After a preemption
        nothing new is admitted: memory is short. A request whose grammar is still compiling is
        passed over (it keeps its place), not waited for."""
        compiling = []
        while self.waiting and budget > 0 and not out.preempted and len(self.running) < self.max_num_seqs:
            req = self.waiting[0][1]
            if req.num_inflight:
                break  # preempted with a token in flight: admitted once the host has that token
            if req.grammar is not None and not req.grammar.ready():
                compiling.append(heapq.heappop(self.waiting))
                continue
            if req.grammar is not None and req.grammar.error is not None:
                heapq.heappop(self.waiting)
                out.grammar_failed.append(req)
                continue
            background = self._bg_seats is not None and self.background.is_background(req.priority)
            if background and (self._bg_seats == 0 or self._bg_prefill == 0):
                break  # the queue is by priority: everything after is background too
            cached, num_cached = self.kv.get_computed_blocks(req)
            n = min(req.num_tokens - req.num_computed_tokens - num_cached, budget)
            if background:
                n = min(n, self._bg_prefill)
            if not self.kv.allocate_slots(req, n, cached):
                break
            if background:
                self._bg_seats -= 1
                self._bg_prefill -= n
            heapq.heappop(self.waiting)
            req.num_computed_tokens += num_cached
            if req.metrics.first_scheduled_time is None:
                req.metrics.num_cached_tokens = num_cached
            req.status = RequestStatus.RUNNING
            bisect.insort(self.running, req, key=lambda r: r.sort_key)
            self._add_to_output(out, req, n)
            budget -= n
        for item in compiling:
            heapq.heappush(self.waiting, item)
        return budget

    @staticmethod
    def _add_to_output(out: SchedulerOutput, req: Request, n: int) -> None:
        out.num_scheduled_tokens[req.request_id] = n
        out.requests.append(req)

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        self.running.remove(req)
        self.kv.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        out.preempted.append(req)
        heapq.heappush(self.waiting, (req.sort_key, req))

    def update_after_step(self, out: SchedulerOutput) -> None:
        """Advance computed counts once the model has run the scheduled tokens."""
        for req in out.requests:
            req.num_computed_tokens += out.num_scheduled_tokens[req.request_id]
            self.kv.cache_full_blocks(req)

    def finish(self, req: Request, status: RequestStatus) -> None:
        """Remove a request (finished or aborted) wherever it is, and free its blocks now."""
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        elif req.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED):
            self.waiting = [(k, r) for k, r in self.waiting if r is not req]
            heapq.heapify(self.waiting)
        req.status = status
        self.kv.free(req)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)
