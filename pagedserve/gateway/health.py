"""Background loops: active health checks, load scrapes, and backend discovery.

Every `health.interval_s` each backend with a health check gets `GET <root>/health`; a pool that
balances by load (or has a queue-depth threshold) also gets its `/metrics` scraped for
vllm:num_requests_waiting / num_requests_running / kv_cache_usage_perc. A failed or slow check
counts as a failure for the circuit breaker; a passing one puts an ejected backend back.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from pagedserve.gateway.backends import Backend, Pool, apply_discovery, discover_urls

log = logging.getLogger("pagedserve.gateway")

LOAD_METRICS = {
    "vllm:num_requests_waiting": "num_waiting",
    "vllm:num_requests_running": "num_running",
    "vllm:kv_cache_usage_perc": "kv_usage",
}


def parse_load(text: str) -> dict[str, float]:
    """Sum the load gauges over label sets (one replica may expose several model names)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        attr = LOAD_METRICS.get(name)
        if attr:
            try:
                out[attr] = out.get(attr, 0.0) + float(line.rsplit(" ", 1)[1])
            except ValueError:
                pass
    return out


class Monitor:
    def __init__(self, client: aiohttp.ClientSession, pools: dict[str, Pool], interval_s: float, timeout_s: float):
        self.client, self.pools, self.interval_s, self.timeout_s = client, pools, interval_s, timeout_s

    def _wants_load(self, pool: Pool) -> bool:
        return pool.cfg.policy == "least_load" or pool.cfg.max_queue_depth is not None

    async def check(self, b: Backend, scrape: bool) -> None:
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        try:
            async with self.client.get(f"{b.root}/health", timeout=timeout) as r:
                await r.read()
                ok, why = r.status == 200, f"/health answered {r.status}"
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            ok, why = False, f"/health: {type(e).__name__}"
        if not ok:
            b.record_failure(why)
            return
        b.record_success()
        if scrape:
            try:
                async with self.client.get(f"{b.root}/metrics", timeout=timeout) as r:
                    text = await r.text()
                for attr, v in parse_load(text).items():
                    setattr(b, attr, v)
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass  # health passed; load stays at its last value

    async def check_all(self) -> None:
        scrape: dict[int, tuple[Backend, bool]] = {}  # a backend in two pools is checked once
        for pool in self.pools.values():
            for b in pool.backends:
                if b.health_check:
                    scrape[id(b)] = (b, scrape.get(id(b), (b, False))[1] or self._wants_load(pool))
        await asyncio.gather(*(self.check(b, s) for b, s in scrape.values()))

    async def run_health(self) -> None:
        while True:
            try:
                await self.check_all()
            except Exception:
                log.exception("health check round failed")
            await asyncio.sleep(self.interval_s)

    async def run_discovery(self, pool: Pool) -> None:
        d = pool.cfg.discovery
        while True:
            try:
                if apply_discovery(pool, await discover_urls(d)):
                    await asyncio.gather(*(self.check(b, self._wants_load(pool)) for b in pool.backends
                                           if b.discovered))
            except Exception as e:  # keep the last known set; say why
                log.warning("pool %s: discovery from %s failed: %s", pool.name, d.file or d.dns, e)
            await asyncio.sleep(d.interval_s)
