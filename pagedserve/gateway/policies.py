"""Balancing policies: one interface, one small class each.

A policy picks one backend from the candidates a pool offers (available ones, minus backends this
request already tried). Policies never see health or retries; the proxy owns those.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import OrderedDict
from dataclasses import dataclass

from pagedserve.gateway.backends import Backend


@dataclass
class RequestInfo:
    """What a policy may look at: the session header, if any, and the prompt text."""
    session: str | None = None
    prompt: str = ""


class RoutingPolicy:
    def choose(self, candidates: list[Backend], req: RequestInfo) -> Backend:
        raise NotImplementedError


class RoundRobin(RoutingPolicy):
    def __init__(self):
        self._counter = itertools.count()

    def choose(self, candidates, req):
        return candidates[next(self._counter) % len(candidates)]


class LeastOutstanding(RoutingPolicy):
    """Fewest requests this gateway has in flight to it; ties go round robin."""

    def __init__(self):
        self._rr = itertools.count()

    def choose(self, candidates, req):
        low = min(b.outstanding for b in candidates)
        ties = [b for b in candidates if b.outstanding == low]
        return ties[next(self._rr) % len(ties)]


class LeastLoad(RoutingPolicy):
    """Lowest load as the replicas report it (/metrics, scraped every health interval): queue depth
    first, then KV-cache use, plus what this gateway sent since the last scrape."""

    def choose(self, candidates, req):
        return min(candidates, key=lambda b: (b.num_waiting + b.outstanding / 4 + b.kv_usage, b.outstanding))


class PrefixAffinity(RoutingPolicy):
    """Requests that share a session id or a prompt prefix go to the same replica, so its prefix
    cache hits. The prompt is cut into chunks of `chunk_chars`; the table maps the hash of each
    prefix (chunk 1, chunks 1-2, ...) to the replica that served it. A new request follows its
    longest known prefix; unknown prefixes go to the least-loaded replica. The table is an LRU of
    at most `max_entries` keys, so memory stays bounded however many prompts pass through."""

    def __init__(self, max_entries: int = 100_000, chunk_chars: int = 256, max_chunks: int = 16):
        self.max_entries, self.chunk_chars, self.max_chunks = max_entries, chunk_chars, max_chunks
        self.table: OrderedDict[bytes, str] = OrderedDict()
        self._fallback = LeastOutstanding()

    def _keys(self, req: RequestInfo) -> list[bytes]:
        if req.session:
            return [b"s:" + req.session.encode()]
        keys, h = [], hashlib.blake2b(digest_size=16)
        text = req.prompt
        n = min(len(text) // self.chunk_chars, self.max_chunks)  # only whole chunks: a shared prefix
        for i in range(n):
            h.update(text[i * self.chunk_chars:(i + 1) * self.chunk_chars].encode("utf-8", "surrogatepass"))
            keys.append(h.copy().digest())
        return keys or [hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()]

    def choose(self, candidates, req):
        keys = self._keys(req)
        by_name = {b.name: b for b in candidates}
        chosen = None
        for k in reversed(keys):  # longest known prefix whose replica is still a candidate
            name = self.table.get(k)
            if name in by_name:
                chosen = by_name[name]
                break
        if chosen is None:
            chosen = self._fallback.choose(candidates, req)
        for k in keys:
            self.table[k] = chosen.name
            self.table.move_to_end(k)
        while len(self.table) > self.max_entries:
            self.table.popitem(last=False)
        return chosen


def make_policy(name: str, max_entries: int = 100_000) -> RoutingPolicy:
    return {
        "round_robin": RoundRobin,
        "least_outstanding": LeastOutstanding,
        "least_load": LeastLoad,
        "prefix_affinity": lambda: PrefixAffinity(max_entries=max_entries),
    }[name]()


class WeightedSplit:
    """Smooth weighted round robin (as nginx does it): over any window the shares match the weights
    to within one request, with the targets interleaved rather than in bursts."""

    def __init__(self, targets: list[tuple[str, float]]):
        self.targets = targets
        self.current = [0.0] * len(targets)
        self.total = sum(w for _, w in targets)

    def choose(self) -> str:
        for i, (_, w) in enumerate(self.targets):
            self.current[i] += w
        best = max(range(len(self.targets)), key=lambda i: self.current[i])
        self.current[best] -= self.total
        return self.targets[best][0]
