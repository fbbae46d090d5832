"""The gateway's pure parts: policies, weighted split, circuit breaker, discovery, config errors."""

from __future__ import annotations

import asyncio
import json
import datetime as dt
import time

import pytest

from pagedserve.gateway.backends import Backend, Pool, apply_discovery, discover_urls
from pagedserve.gateway.cli import parse_since
from pagedserve.gateway.config import ConfigError, DiscoveryConfig, PoolConfig, load_config
from pagedserve.gateway.health import parse_load
from pagedserve.gateway.keys import KeyInfo, RateLimiter
from pagedserve.gateway.policies import (LeastLoad, LeastOutstanding, PrefixAffinity, RequestInfo, RoundRobin,
                                         WeightedSplit)


def backends(n: int) -> list[Backend]:
    return [Backend(name=f"b{i}", url=f"http://127.0.0.1:{9000 + i}/v1") for i in range(n)]


def test_round_robin_and_least_outstanding():
    bs = backends(3)
    rr = RoundRobin()
    assert [rr.choose(bs, RequestInfo()).name for _ in range(6)] == ["b0", "b1", "b2", "b0", "b1", "b2"]
    bs[0].outstanding, bs[1].outstanding, bs[2].outstanding = 4, 1, 2
    assert LeastOutstanding().choose(bs, RequestInfo()).name == "b1"


def test_least_load_prefers_short_queues_then_free_kv():
    bs = backends(3)
    bs[0].num_waiting, bs[1].num_waiting, bs[2].num_waiting = 5, 0, 0
    bs[1].kv_usage, bs[2].kv_usage = 0.9, 0.2
    assert LeastLoad().choose(bs, RequestInfo()).name == "b2"


def test_prefix_affinity_follows_the_longest_known_prefix_with_bounded_memory():
    bs = backends(4)
    p = PrefixAffinity(max_entries=50, chunk_chars=16)
    shared = "system prompt for the support team. " * 4
    first = p.choose(bs, RequestInfo(prompt=shared + "question one"))
    first.outstanding += 10  # even when it is busier, the shared prefix sticks
    assert all(p.choose(bs, RequestInfo(prompt=shared + f"q{i}")) is first for i in range(5))
    assert p.choose(bs, RequestInfo(session="s1")) is p.choose(bs, RequestInfo(session="s1"))
    for i in range(1000):  # many distinct prompts: the table never exceeds its bound
        p.choose(bs, RequestInfo(prompt=f"{i:08d} unrelated prompt text number {i}"))
        assert len(p.table) <= 50
    # If the remembered replica is gone, the request goes elsewhere instead of failing.
    others = [b for b in bs if b is not first]
    assert p.choose(others, RequestInfo(prompt=shared + "again")) in others


def test_weighted_split_is_exact_and_interleaved():
    ws = WeightedSplit([("a", 80), ("b", 20)])
    picks = [ws.choose() for _ in range(1000)]
    assert picks.count("b") == 200
    assert max(len(run) for run in "".join(picks).split("b")) <= 4  # no long bursts of one target
    canary = WeightedSplit([("stable", 95), ("canary", 5)])
    assert [canary.choose() for _ in range(100)].count("canary") == 5


def test_circuit_breaker_ejects_after_threshold_and_half_opens_without_health_checks():
    # A cool-down long enough that a loaded machine's stall between two lines cannot end it.
    b = Backend(name="x", url="http://h/v1", failure_threshold=2, cooldown_s=1.0, health_check=False)
    b.record_failure("e1")
    assert b.available()
    b.record_failure("e2")
    assert not b.available()
    time.sleep(1.05)
    assert b.available()  # half-open: one trial
    b.record_failure("e3")
    assert not b.available()  # failed trial: ejected again
    b.record_success()
    assert b.available() and b.consecutive_failures == 0
    active = Backend(name="y", url="http://h/v1", failure_threshold=1, cooldown_s=0.01)
    active.record_failure("down")
    time.sleep(0.05)
    assert not active.available()  # with active checks only a passing check re-admits it


def test_saturation_by_queue_depth():
    pool = Pool(PoolConfig(name="p", backends=["b0", "b1"], max_queue_depth=8), backends(2))
    pool.backends[0].num_waiting = 9
    assert not pool.saturated(pool.backends)
    pool.backends[1].num_waiting = 8
    assert pool.saturated(pool.backends)


def test_rate_limiter_windows():
    key = KeyInfo("k", "", "d", ("*",), rpm=2, tpm=100, monthly_budget=None)
    rl = RateLimiter()
    assert rl.check(key, now=0) is None and rl.check(key, now=1) is None
    what, retry = rl.check(key, now=2)
    assert "requests per minute" in what and retry == pytest.approx(58)
    assert rl.check(key, now=61) is None  # the first request left the window
    key2 = KeyInfo("k2", "", "d", ("*",), rpm=None, tpm=100, monthly_budget=None)
    assert rl.check(key2, now=0) is None
    rl.add_tokens("k2", 150, now=0)
    assert "tokens per minute" in rl.check(key2, now=10)[0]


def test_discovery_from_dns_and_file(tmp_path):
    urls = asyncio.run(discover_urls(DiscoveryConfig(dns="localhost", port=8123)))
    assert urls == ["http://127.0.0.1:8123/v1"]
    f = tmp_path / "list.txt"
    f.write_text("# comment\nhttp://a:1/v1/\n\nhttp://b:2/v1\n")
    assert asyncio.run(discover_urls(DiscoveryConfig(file=str(f)))) == ["http://a:1/v1", "http://b:2/v1"]
    pool = Pool(PoolConfig(name="p", discovery=DiscoveryConfig(file=str(f))))
    assert apply_discovery(pool, ["http://a:1/v1", "http://b:2/v1"])
    a = pool.backends[0]
    a.outstanding = 3
    assert apply_discovery(pool, ["http://a:1/v1"]) and pool.backends == [a] and a.outstanding == 3
    assert not apply_discovery(pool, ["http://a:1/v1"])
    # A file caught mid-rewrite (truncated, not yet written) is an error: the pool keeps its set.
    f.write_text("")
    with pytest.raises(ValueError, match="empty .* keeping the last set"):
        asyncio.run(discover_urls(DiscoveryConfig(file=str(f))))
    f.write_text("# no backends now\n")
    assert asyncio.run(discover_urls(DiscoveryConfig(file=str(f)))) == []


def test_parse_load_and_since():
    text = ('# HELP x\nvllm:num_requests_waiting{model_name="a"} 3.0\nvllm:num_requests_waiting{model_name="b"} 2.0\n'
            'vllm:kv_cache_usage_perc{model_name="a"} 0.25\nvllm:num_requests_running{model_name="a"} 7.0\n')
    assert parse_load(text) == {"num_waiting": 5.0, "kv_usage": 0.25, "num_running": 7.0}
    now = dt.datetime(2026, 11, 23, 12, 0)
    assert parse_since("2h", now) == dt.datetime(2026, 11, 23, 10, 0)
    assert parse_since("2026-11-01", now) == dt.datetime(2026, 11, 1)
    with pytest.raises(ValueError, match="--since"):
        parse_since("last tuesday", now)


@pytest.mark.parametrize("text,expect", [
    ("pools: [\n", ":2: not valid YAML"),
    ("pools:\n  - name: a\n    backends: [x]\n    backends: [y]\nmodels: []\n", ":4: duplicate key 'backends'"),
    ("backends:\n  - {name: x, url: ftp://h}\npools:\n  - {name: a, backends: [x]}\nmodels:\n  - {name: m, pool: a}\n",
     ":2: backends.0.url: url must start with http"),
    ("backends:\n  - {name: x, url: http://h/v1}\npools:\n  - {name: a, backends: [x], fallback: a}\n"
     "models:\n  - {name: m, pool: a}\n", ":4: pool 'a' cannot fall back to itself"),
    ("backends:\n  - {name: x, url: http://h/v1}\npools:\n  - {name: a, backends: [x]}\nmodels:\n"
     "  - {name: m, pool: a, split: [{pool: a, weight: 1}]}\n", ":6: models.0: model 'm' needs exactly one of"),
])
def test_config_errors_name_the_line(tmp_path, text, expect):
    path = tmp_path / "g.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(path, env={})
    assert str(e.value).startswith(str(path)) and expect in str(e.value), str(e.value)


def test_example_config_is_valid():
    from pathlib import Path

    cfg = load_config(Path(__file__).resolve().parent.parent / "examples/gateway.yaml", env={"OPENAI_API_KEY": "x"})
    assert {m.name for m in cfg.models} == {"llama-8b", "llama-8b-canary", "auto"}


def test_public_model_name_replaces_only_the_top_level_field():
    from pagedserve.gateway.proxy import _model_field, _public_model

    ev = b'data: {"id":"c1","model":"upstream","choices":[{"text":"\\"model\\": \\"x\\""}]}'
    out = _public_model(ev, _model_field("pub"))
    assert out == ev.replace(b'"model":"upstream"', b'"model":"pub"')
    body = b'{"id": "c", "object": "chat.completion", "model": "gpt-4o-mini-2024-07-18", "choices": []}'
    assert json.loads(_public_model(body, _model_field('we"ird\n'))) == {
        "id": "c", "object": "chat.completion", "model": 'we"ird\n', "choices": []}
    assert _public_model(b'{"id": "c"}', _model_field("pub")) == b'{"id": "c"}'  # no model field: unchanged


def test_trace_tells_its_own_time_limit_from_a_backend_timeout():
    """A backend that accepts and never answers: aiohttp's total timer (what _post sets from the
    request's deadline) counts as the request's limit even when it fires before time.monotonic()
    reaches the deadline (uvloop schedules on a cached ms clock); its read timer is the backend's
    fault until the deadline has passed."""
    import aiohttp
    from pagedserve.gateway.proxy import Trace

    async def run():
        silent = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{silent.sockets[0].getsockname()[1]}/"
        errors = {}
        async with aiohttp.ClientSession() as s:
            for name, t in {"total": aiohttp.ClientTimeout(total=0.2),
                            "read": aiohttp.ClientTimeout(sock_read=0.2)}.items():
                try:
                    async with s.post(url, data=b"{}", timeout=t):
                        pass
                except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                    errors[name] = e
        silent.close()
        return errors

    errors = asyncio.run(run())
    trace = Trace()
    trace.deadline = time.monotonic() + 3600
    assert trace.ran_out(errors["total"]) and not trace.ran_out(errors["read"]), errors
    trace.deadline = time.monotonic() - 1
    assert trace.ran_out(errors["read"])
