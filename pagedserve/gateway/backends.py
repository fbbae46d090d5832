"""Backends (one OpenAI-compatible server each) and pools, with the circuit breaker that ejects them.

A backend is *available* when it is healthy, or when it has no active health check and its
cool-down after ejection has passed (half-open: the next request is the trial). Active checks
and passive failures both count towards `failure_threshold`; one success closes the breaker.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from pagedserve.gateway.config import BackendConfig, DiscoveryConfig, PoolConfig

log = logging.getLogger("pagedserve.gateway")


@dataclass
class Backend:
    name: str
    url: str  # base URL ending in /v1 (or whatever prefix the provider uses)
    api_key: str | None = None
    health_check: bool = True
    model: str | None = None
    failure_threshold: int = 3
    cooldown_s: float = 10.0
    # live state
    healthy: bool = True
    consecutive_failures: int = 0
    ejected_at: float = 0.0
    outstanding: int = 0
    num_waiting: float = 0.0      # vllm:num_requests_waiting, scraped
    num_running: float = 0.0      # vllm:num_requests_running, scraped
    kv_usage: float = 0.0         # vllm:kv_cache_usage_perc, scraped (0..1)
    discovered: bool = False

    @property
    def root(self) -> str:
        """The server root (health and metrics live there, not under /v1)."""
        return self.url[: -len("/v1")] if self.url.endswith("/v1") else self.url

    def available(self, now: float | None = None) -> bool:
        if self.healthy:
            return True
        if self.health_check:
            return False  # the active checker re-admits it
        return (now or time.monotonic()) - self.ejected_at >= self.cooldown_s

    def record_success(self) -> None:
        if not self.healthy:
            log.info("backend %s is back in its pool", self.name)
        self.healthy, self.consecutive_failures = True, 0

    def record_failure(self, why: str) -> None:
        self.consecutive_failures += 1
        if self.healthy and self.consecutive_failures >= self.failure_threshold:
            log.warning("backend %s ejected after %d consecutive failures (last: %s)",
                        self.name, self.consecutive_failures, why)
            self.healthy = False
        if not self.healthy:
            self.ejected_at = time.monotonic()


def make_backend(cfg: BackendConfig, pool: PoolConfig) -> Backend:
    return Backend(name=cfg.name, url=cfg.url, api_key=os.environ.get(cfg.api_key_env) if cfg.api_key_env else None,
                   health_check=cfg.health_check, model=cfg.model, failure_threshold=pool.failure_threshold,
                   cooldown_s=pool.cooldown_s)


@dataclass
class Pool:
    cfg: PoolConfig
    backends: list[Backend] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.cfg.name

    def available(self) -> list[Backend]:
        now = time.monotonic()
        return [b for b in self.backends if b.available(now)]

    def saturated(self, candidates: list[Backend]) -> bool:
        """True when every candidate is over the queue-depth or in-flight threshold."""
        c = self.cfg
        if not candidates or (c.max_queue_depth is None and c.max_outstanding is None):
            return False

        def full(b: Backend) -> bool:
            return ((c.max_queue_depth is not None and b.num_waiting >= c.max_queue_depth)
                    or (c.max_outstanding is not None and b.outstanding >= c.max_outstanding))
        return all(full(b) for b in candidates)


# -- discovery ---------------------------------------------------------------------------------

async def discover_urls(d: DiscoveryConfig) -> list[str]:
    """Current backend URLs from a list file (one URL per line, # comments) or a DNS name. A file
    of zero bytes is one being rewritten in place (truncated, not yet written): an error, so the
    pool keeps its last set rather than dropping every backend for an interval (a rolling update's
    test caught exactly that); a file of only comments means no backends."""
    if d.file is not None:
        text = await asyncio.to_thread(Path(d.file).read_text)
        if not text:
            raise ValueError("the file is empty (being rewritten?): keeping the last set. Replace it atomically "
                             "(write another file, then rename it over this one); a comment line alone means "
                             "no backends")
        return [ln.strip().rstrip("/") for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    infos = await asyncio.get_running_loop().getaddrinfo(d.dns, d.port, family=socket.AF_INET, type=socket.SOCK_STREAM)
    ips = sorted({info[4][0] for info in infos})
    return [f"{d.scheme}://{ip}:{d.port}{d.path}" for ip in ips]


def apply_discovery(pool: Pool, urls: list[str]) -> bool:
    """Make the pool's discovered backends match `urls`, keeping the state of the ones that stay."""
    current = {b.url: b for b in pool.backends if b.discovered}
    if set(current) == set(urls):
        return False
    static = [b for b in pool.backends if not b.discovered]
    kept = []
    for url in urls:
        b = current.get(url) or Backend(name=f"{pool.name}:{url.split('://', 1)[-1]}", url=url, discovered=True,
                                        failure_threshold=pool.cfg.failure_threshold, cooldown_s=pool.cfg.cooldown_s)
        kept.append(b)
    pool.backends = static + kept
    log.info("pool %s: discovered backends now %s", pool.name, [b.url for b in kept])
    return True
