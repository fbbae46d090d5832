"""Continuous (iteration-level) batching.

Each step decides how many tokens every request computes: `{request_id: num_tokens}`.
There is no prefill/decode phase: a request simply has tokens it has not computed yet (a whole
prompt, a chunk of one, or the one token sampled last step), so prefill chunks and decodes share
a step under one token budget. Requests run in (priority, arrival) order; when KV blocks run
out, the lowest-priority running request is preempted: its blocks are freed and it is recomputed
later (its prefix blocks usually survive in the prefix cache).
"""

from __future__ import annotations

import bisect
import heapq
from dataclasses import dataclass, field

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
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
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
        # 1. Running requests keep going, preempting from the tail when blocks run out.
        for req in list(self.running):
            if budget == 0:
                break
            if req.status is not RequestStatus.RUNNING:  # preempted earlier in this loop
                continue
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.kv.allocate_slots(req, n):
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is req:
                    n = 0
                    break
            if n:
                self._add_to_output(out, req, n)
                budget -= n
        # 2. Admit waiting requests while budget, sequence slots and blocks allow. After a
        # preemption nothing new is admitted: memory is short. A request whose grammar is still
        # compiling is passed over (it keeps its place), not waited for.
        compiling = []
        while self.waiting and budget > 0 and not out.preempted and len(self.running) < self.max_num_seqs:
            req = self.waiting[0][1]
            if req.grammar is not None and not req.grammar.ready():
                compiling.append(heapq.heappop(self.waiting))
                continue
            if req.grammar is not None and req.grammar.error is not None:
                heapq.heappop(self.waiting)
                out.grammar_failed.append(req)
                continue
            cached, num_cached = self.kv.get_computed_blocks(req)
            n = min(req.num_tokens - req.num_computed_tokens - num_cached, budget)
            if not self.kv.allocate_slots(req, n, cached):
                break
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
        return out

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
