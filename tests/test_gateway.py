"""The gateway, end to end: real pagedserve replicas (tiny model) and a real "provider" server behind a
real gateway process, driven with the official openai client; faults are real signals.

Tests run in file order and the last ones are destructive (kill -9, SIGSTOP, all replicas down).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from server_utils import ServerProcess
from sqlalchemy import func, select

from pagedserve.gateway.store import audit_log, open_db

ROOT = Path(__file__).resolve().parent.parent
PROVIDER_KEY = "provider-secret-key"
ADMIN_KEY = "gateway-admin-key"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "pagedserve.cli", *args], capture_output=True, text=True, timeout=120)
    if check and r.returncode != 0:
        raise AssertionError(f"pagedserve {' '.join(args)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
    return r


def create_key(db_url: str, department: str, *extra: str) -> tuple[str, str]:
    out = cli("gateway", "keys", "create", "--db", db_url, "--department", department, *extra).stdout
    fields = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
    return fields["id"], fields["key"]


def semantic_section(pools: dict[str, str]) -> dict:
    """The semantic routes of examples/gateway.yaml, pointed at this test's pools."""
    example = yaml.safe_load((ROOT / "examples/gateway.yaml").read_text())
    sem = next(m["semantic"] for m in example["models"] if "semantic" in m)
    for r in sem["routes"]:
        r["pool"] = pools[r["name"]]
    return sem


def gateway_config(replicas: dict, db_url: str, discovery_file: Path | None = None) -> dict:
    r = replicas
    backends = [{"name": n, "url": r[n].base} for n in ("r1", "r2", "r3")]
    backends.append({"name": "provider", "url": r["provider"].base, "api_key_env": "PROVIDER_KEY",
                     "health_check": False, "model": "provider-model"})
    common = dict(model="tiny", max_attempts=3, read_timeout_s=5, connect_timeout_s=1, failure_threshold=2,
                  prices={"input_per_million": 1.0, "output_per_million": 2.0})
    pools = [
        dict(name="local", backends=["r1", "r2", "r3"], policy="least_outstanding", fallback="external",
             cost_per_hour=3.6, **common),
        dict(name="sticky", backends=["r1", "r2", "r3"], policy="prefix_affinity", **common),
        dict(name="tight", backends=["r3"], max_outstanding=1, fallback="external", **common),
        dict(name="external", backends=["provider"], policy="round_robin", cooldown_s=2,
             prices={"input_per_million": 0.15, "output_per_million": 0.6}),
    ]
    if discovery_file is not None:
        pools.append(dict(name="discovered", discovery={"file": str(discovery_file), "interval_s": 0.3},
                          policy="round_robin", model="tiny"))
    models = [
        {"name": "tiny", "pool": "local"},
        {"name": "tiny-sticky", "pool": "sticky"},
        {"name": "tiny-tight", "pool": "tight"},
        {"name": "tiny-split", "split": [{"pool": "local", "weight": 80}, {"pool": "external", "weight": 20}]},
        {"name": "auto", "semantic": semantic_section({"simple": "local", "coding": "sticky", "reasoning": "sticky"})},
    ]
    if discovery_file is not None:
        models.append({"name": "tiny-discovered", "pool": "discovered"})
    return {
        "server": {"admin_key_env": "GW_ADMIN_KEY"},
        "database": {"url": db_url, "flush_interval_s": 0.1},
        "auth": {"require_key": True, "refresh_s": 0.3},
        "health": {"interval_s": 0.3, "timeout_s": 0.5},
        "backends": backends, "pools": pools, "models": models,
    }


def start_gateway(cfg: dict, tmp: Path, name: str = "gateway") -> ServerProcess:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return ServerProcess(["--config", str(path), "--uvicorn-log-level", "warning"], tmp / f"{name}.log",
                         env={"PROVIDER_KEY": PROVIDER_KEY, "GW_ADMIN_KEY": ADMIN_KEY}, command="gateway")


def rows(db_url: str, after_id: int = 0, expect: int | None = None, timeout: float = 15) -> list:
    """Audit rows with id > after_id; waits until `expect` rows are there (the writer batches)."""
    db = open_db(db_url)
    deadline = time.monotonic() + timeout
    while True:
        with db.connect() as conn:
            got = conn.execute(select(audit_log).where(audit_log.c.id > after_id).order_by(audit_log.c.id)).all()
        if expect is None or len(got) >= expect or time.monotonic() > deadline:
            db.dispose()
            return got
        time.sleep(0.1)


def last_id(db_url: str) -> int:
    db = open_db(db_url)
    with db.connect() as conn:
        n = conn.execute(select(func.max(audit_log.c.id))).scalar() or 0
    db.dispose()
    return n


@pytest.fixture(scope="module")
def replicas(tiny_dirs, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gw-replicas")
    tiny = str(tiny_dirs["llama"])
    args = ["--served-model-name", "tiny", "--kv-cache-memory", "32MiB", "--max-model-len", "512"]
    specs = {n: ([tiny, *args], {}) for n in ("r1", "r2", "r3")}
    specs["provider"] = ([tiny, "--served-model-name", "provider-model", "--kv-cache-memory", "32MiB",
                          "--max-model-len", "512", "--api-key", PROVIDER_KEY], {})
    with ThreadPoolExecutor(4) as ex:
        futs = {n: ex.submit(ServerProcess, a, tmp / f"{n}.log", e) for n, (a, e) in specs.items()}
        procs = {n: f.result() for n, f in futs.items()}
    yield procs
    for p in procs.values():
        if p.proc.poll() is None:
            os.kill(p.proc.pid, signal.SIGCONT)
        p.stop()


@pytest.fixture(scope="module")
def env(replicas, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gw")
    db_url = f"sqlite:///{tmp / 'audit.db'}"
    disc = tmp / "backends.txt"
    disc.write_text(f"# one URL per line\n{replicas['r1'].base}\n")
    _, key = create_key(db_url, "engineering")
    gw = start_gateway(gateway_config(replicas, db_url, disc), tmp)
    client = openai.OpenAI(base_url=gw.base, api_key=key, max_retries=0, timeout=60)
    yield dict(gw=gw, db=db_url, key=key, client=client, tmp=tmp, disc=disc, replicas=replicas)
    assert gw.stop() == 0


# -- basics -------------------------------------------------------------------------------------

def test_chat_completions_models_and_streaming(env):
    c = env["client"]
    assert {m.id for m in c.models.list().data} == {"tiny", "tiny-sticky", "tiny-tight", "tiny-split", "auto",
                                                  "tiny-discovered"}
    start = last_id(env["db"])
    r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=8,
                                  temperature=0)
    assert r.usage.completion_tokens == 8 and r.choices[0].message.content
    comp = c.completions.create(model="tiny", prompt="The sky is", max_tokens=5, temperature=0)
    assert comp.usage.completion_tokens == 5
    # Streaming passes through event by event; usage is only sent when the client asks for it.
    chunks = list(c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=6, temperature=0, stream=True))
    assert all(ch.usage is None for ch in chunks)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    chunks_u = list(c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=6, temperature=0, stream=True,
                                              stream_options={"include_usage": True}))
    assert chunks_u[-1].usage.completion_tokens == 6
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks_u if ch.choices) == text
    got = rows(env["db"], start, expect=4)
    assert [g.status for g in got] == [200] * 4
    assert [g.completion_tokens for g in got] == [8, 5, 6, 6]  # also for the stream that did not ask for usage
    assert all(g.department == "engineering" and g.pool == "local" and g.backend in ("r1", "r2", "r3") for g in got)
    assert got[2].stream and got[2].ttft_s is not None and got[2].ttft_s <= got[2].latency_s
    assert got[0].cost == pytest.approx((got[0].prompt_tokens * 1.0 + 8 * 2.0) / 1e6)
    # Responses name the model the client asked for, not the pool's upstream name ("tiny").
    r = c.chat.completions.create(model="tiny-sticky", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert r.model == "tiny-sticky"
    chunks = list(c.completions.create(model="tiny-sticky", prompt='say "model": "tiny"', max_tokens=3, stream=True))
    assert chunks and {ch.model for ch in chunks} == {"tiny-sticky"}


def test_structured_outputs_and_tools_pass_through(env):
    """response_format, structured_outputs and tools reach the replica untouched; tokens are counted."""
    c = env["client"]
    start = last_id(env["db"])
    tool = {"type": "function", "function": {"name": "pick", "parameters": {
        "type": "object", "properties": {"x": {"enum": [1, 2]}}, "required": ["x"], "additionalProperties": False}}}
    r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "pick"}], tools=[tool],
                                  tool_choice={"type": "function", "function": {"name": "pick"}}, temperature=0,
                                  max_tokens=128)
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "pick" and json.loads(call.function.arguments)["x"] in (1, 2)
    chunks = list(c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "colour?"}],
                                            max_tokens=16, temperature=0, stream=True,
                                            extra_body={"structured_outputs": {"choice": ["red", "blue"]}}))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) in ("red", "blue")
    bad = httpx.post(f"{env['gw'].base}/chat/completions", headers={"Authorization": f"Bearer {env['key']}"},
                     json={"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                           "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "response_format"
    # Only this test's rows (model "tiny"): the previous test's last stream may be written after `start`.
    deadline = time.monotonic() + 15
    while len(got := [g for g in rows(env["db"], start) if g.model == "tiny"]) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [g.status for g in got] == [200, 200, 400]
    assert got[0].completion_tokens == r.usage.completion_tokens


def test_errors_are_openai_shaped(env):
    gw, key = env["gw"], env["key"]
    h = {"Authorization": f"Bearer {key}"}
    r = httpx.post(f"{gw.base}/chat/completions", json={"model": "nope", "messages": []}, headers=h)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.post(f"{gw.base}/chat/completions", content=b"{not json", headers=h)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{gw.base}/chat/completions", json={"model": "tiny", "messages": []})
    assert r.status_code == 401 and "missing API key" in r.json()["error"]["message"]
    r = httpx.post(f"{gw.base}/chat/completions", json={"model": "tiny", "messages": []},
                   headers={"Authorization": "Bearer psk-wrong"})
    assert r.status_code == 401
    # The backend's own 4xx comes through unchanged (not retried, not turned into a 5xx).
    r = httpx.post(f"{gw.base}/completions", json={"model": "tiny", "prompt": "x", "max_tokens": -3}, headers=h)
    assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]
    r = httpx.post(f"{gw.base}/completions", content=b"x" * (5 << 20), headers=h)
    assert r.status_code == 413


def test_authentication_edges_and_admin_routes(env):
    """The scheme in any case; no bare keys; the key is checked before the body is read; refused
    keys write no audit row (a counter instead); /metrics and /openapi.json need the admin key."""
    gw, key = env["gw"], env["key"]
    body = {"model": "tiny", "prompt": "x", "max_tokens": 1}
    before = last_id(env["db"])
    assert httpx.post(f"{gw.base}/completions", json=body, headers={"Authorization": f"bearer {key}"}).status_code == 200
    assert httpx.post(f"{gw.base}/completions", json=body, headers={"Authorization": f"BEARER  {key}"}).status_code == 200
    assert len(rows(env["db"], before, expect=2)) == 2
    start = last_id(env["db"])
    for h in ({"Authorization": key}, {"Authorization": f"Basic {key}"}, {"Authorization": "Bearer"}):
        r = httpx.post(f"{gw.base}/completions", json=body, headers=h)
        assert r.status_code == 401 and "malformed Authorization" in r.json()["error"]["message"], (h, r.text)
    r = httpx.post(f"{gw.base}/completions", content=b"{not json")  # no key: 401, not 400
    assert r.status_code == 401
    r = httpx.post(f"{gw.base}/completions", content=b"{not json", headers={"Authorization": "Bearer psk-nope"})
    assert r.status_code == 401
    # One authenticated request after them: its row is the only new one.
    httpx.post(f"{gw.base}/completions", json=body, headers={"Authorization": f"Bearer {key}"})
    time.sleep(0.5)
    got = rows(env["db"], start, expect=1)
    assert [(g.status, g.department) for g in got] == [(200, "engineering")]
    assert httpx.get(f"{gw.url}/metrics").status_code == 401
    assert httpx.get(f"{gw.url}/metrics", headers={"Authorization": f"Bearer {key}"}).status_code == 401
    text = httpx.get(f"{gw.url}/metrics", headers=ADMIN).text
    assert 'pagedserve_gateway_rejected_total{reason="invalid_api_key"}' in text
    assert httpx.get(f"{gw.url}/openapi.json").status_code == 401
    assert "/v1/models" in httpx.get(f"{gw.url}/openapi.json", headers=ADMIN).json()["paths"]
    assert httpx.get(f"{gw.url}/docs").status_code == 404 and httpx.get(f"{gw.url}/redoc").status_code == 404


def test_file_discovery_picks_up_new_backends(env):
    c, reps = env["client"], env["replicas"]
    start = last_id(env["db"])
    for _ in range(3):
        c.completions.create(model="tiny-discovered", prompt="a", max_tokens=1)
    assert {g.backend for g in rows(env["db"], start, expect=3)} == {f"discovered:{reps['r1'].base.split('://')[1]}"}
    env["disc"].write_text(f"{reps['r1'].base}\n{reps['r2'].base}\n")
    wait_pool_available(env, "discovered", 2, 60, "the second discovered backend never became available")
    start = last_id(env["db"])
    for _ in range(4):
        c.completions.create(model="tiny-discovered", prompt="a", max_tokens=1)
    assert len({g.backend for g in rows(env["db"], start, expect=4)}) == 2


# -- routing ------------------------------------------------------------------------------------

def test_weighted_split_80_20_over_1000_requests(env):
    start = last_id(env["db"])
    client = openai.AsyncOpenAI(base_url=env["gw"].base, api_key=env["key"], max_retries=0, timeout=60)

    async def run():
        sem = asyncio.Semaphore(16)

        async def one(i):
            async with sem:
                r = await client.completions.create(model="tiny-split", prompt=f"req {i}", max_tokens=1)
                return r.usage.completion_tokens
        return await asyncio.gather(*(one(i) for i in range(1000)))

    assert sum(asyncio.run(run())) == 1000
    got = rows(env["db"], start, expect=1000)
    assert len(got) == 1000 and all(g.status == 200 for g in got)
    share = sum(g.pool == "external" for g in got) / 1000
    assert abs(share - 0.20) <= 0.05, share
    assert {g.route for g in got} == {"split:local", "split:external"}


def test_prefix_affinity_keeps_a_session_and_a_shared_prefix_on_one_replica(env):
    c = env["client"]
    start = last_id(env["db"])
    for sid in ("alice", "bob", "carol", "dave"):
        for i in range(5):
            c.chat.completions.create(model="tiny-sticky", messages=[{"role": "user", "content": f"q{i}"}],
                                      max_tokens=1, extra_headers={"x-session-id": sid})
    got = rows(env["db"], start, expect=20)
    per_session = [{g.backend for g in got[i * 5:(i + 1) * 5]} for i in range(4)]
    assert all(len(s) == 1 for s in per_session), per_session
    # Without a session header, requests sharing a long system prompt land together too.
    system = "You are a support agent for ACME. " * 30
    start = last_id(env["db"])
    for i in range(6):
        c.chat.completions.create(model="tiny-sticky", max_tokens=1, messages=[
            {"role": "system", "content": system}, {"role": "user", "content": f"question {i}"}])
    assert len({g.backend for g in rows(env["db"], start, expect=6)}) == 1


def test_semantic_routing_accuracy_on_held_out_set(env):
    """>= 90% of the 120 labelled held-out queries take their route, through the real gateway."""
    data = [json.loads(line) for line in (ROOT / "benchmarks/data/semantic_heldout.jsonl").read_text().splitlines()]
    assert len(data) >= 100
    start = last_id(env["db"])
    c = env["client"]
    for x in data:  # one at a time, in order, so audit rows line up with labels
        c.chat.completions.create(model="auto", messages=[{"role": "user", "content": x["query"]}], max_tokens=1)
    got = rows(env["db"], start, expect=len(data))
    routes = [g.route for g in got]
    acc = sum(r == x["route"] for r, x in zip(routes, data)) / len(data)
    assert acc >= 0.90, acc
    assert {g.pool for g, x in zip(got, data) if g.route == "simple"} == {"local"}


def wait_pool_available(env, pool, n, timeout, message):
    """Poll the gateway's /health until `pool` reports n available backends."""
    t0 = time.monotonic()
    while httpx.get(f"{env['gw'].url}/health").json()["pools"][pool]["available"] != n:
        assert time.monotonic() - t0 < timeout, message
        time.sleep(0.1)


def test_saturated_pool_overflows_to_its_fallback(env):
    """Pool 'tight' counts one in-flight request per replica as full: the rest go to the provider.
    The in-flight one is a stream the test holds open (the gateway relays at the client's pace),
    so it is surely in flight when the others arrive, however loaded the machine."""
    # Start from a healthy, idle r3 (an earlier test's load can leave it briefly ejected or busy).
    wait_pool_available(env, "tight", 1, 30, "pool 'tight' never became available")
    start = last_id(env["db"])
    c = env["client"]
    held = c.completions.create(model="tiny-tight", prompt="held", max_tokens=200, stream=True,
                                extra_body={"ignore_eos": True})
    it = iter(held)
    first = next(it)
    assert first.choices
    with ThreadPoolExecutor(3) as ex:
        list(ex.map(lambda i: c.completions.create(model="tiny-tight", prompt=f"p{i}", max_tokens=8), range(3)))
    rest = list(it)
    assert rest
    got = rows(env["db"], start, expect=4)
    assert all(g.status == 200 for g in got)
    assert sorted(g.pool for g in got) == ["external"] * 3 + ["tight"], [(g.pool, g.stream) for g in got]
    assert all(g.fallback == (g.pool == "external") for g in got)
    assert next(g for g in got if g.pool == "tight").stream


# -- keys, limits, budgets -----------------------------------------------------------------------

def test_rate_limit_budget_model_access_and_revocation(env):
    gw, db = env["gw"], env["db"]
    _, limited = create_key(db, "marketing", "--rpm", "3")
    kid, spender = create_key(db, "finance", "--budget", "0.00001", "--models", "tiny")
    rid, revokable = create_key(db, "sales")
    _wait_for_key(gw.base, revokable)  # keys are re-read all at once: the last one known means all are

    def post(key, model="tiny"):
        return httpx.post(f"{gw.base}/completions", json={"model": model, "prompt": "hi", "max_tokens": 2},
                          headers={"Authorization": f"Bearer {key}"}, timeout=30)

    codes = [post(limited).status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]
    r = post(limited)
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(r.headers["retry-after"]) <= 60

    r = post(spender, model="tiny-sticky")
    assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_allowed"
    # Each request costs ~(prompt + 2 * 2) / 1e6; the budget of 1e-5 runs out after a few.
    statuses = [post(spender).status_code for _ in range(8)]
    assert statuses[0] == 200 and statuses[-1] == 402
    assert statuses == sorted(statuses)  # 200s then 402s, never back
    body = post(spender).json()["error"]
    assert body["code"] == "budget_exceeded" and "monthly budget" in body["message"]
    listing = cli("gateway", "keys", "list", "--db", db).stdout
    assert kid in listing and "finance" in listing

    assert post(revokable).status_code == 200
    cli("gateway", "keys", "revoke", "--db", db, rid)
    deadline = time.monotonic() + 5
    while post(revokable).status_code != 401:
        assert time.monotonic() < deadline, "revoked key still accepted"
        time.sleep(0.2)
    assert "revoked" in post(revokable).json()["error"]["message"]


def _burst(base: str, key: str, n: int, workers: int = 50) -> list[int]:
    """n chat requests at once (max_tokens 8, a 2-byte question); their status codes."""
    def one(_):
        return httpx.post(f"{base}/chat/completions", timeout=120, headers={"Authorization": f"Bearer {key}"},
                          json={"model": "tiny", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
                          ).status_code
    with ThreadPoolExecutor(workers) as ex:
        return list(ex.map(one, range(n)))


def _wait_for_key(base: str, key: str) -> None:
    t0 = time.monotonic()
    while httpx.get(f"{base}/models", headers={"Authorization": f"Bearer {key}"}).status_code == 401:
        assert time.monotonic() - t0 < 60, "the gateway never picked up the new key"
        time.sleep(0.1)


# Pool 'local' charges 1.0 per million prompt tokens and 2.0 per million completion tokens; its
# fallback 'external' 0.15 / 0.6. One request's worst case: a prompt of at most 64 (template) + 8
# (one message) + 2 (its bytes) tokens, and 8 completion tokens: 74 * 1e-6 + 8 * 2e-6 = 9.0e-5.
WORST = 9.0e-5


def test_budget_holds_under_100_concurrent_requests(env):
    """Spend was checked at admission and charged at completion: 8 concurrent requests on a budget
    worth one were all admitted. Now each reserves its worst case: 100 at once against a budget of
    about 6 worst cases, and the spend stays within it."""
    budget = 6.5 * WORST
    kid, key = create_key(env["db"], "research", "--budget", str(budget))
    _wait_for_key(env["gw"].base, key)
    start = last_id(env["db"])
    codes = _burst(env["gw"].base, key, 100)
    ok = codes.count(200)
    assert ok >= 6 and codes.count(402) == 100 - ok, codes
    got = [g for g in rows(env["db"], start, expect=100) if g.key_id == kid]
    spent = sum(g.cost for g in got)
    assert spent <= budget + 1e-12, (spent, budget)
    assert sum(g.status == 200 for g in got) == ok
    r = httpx.post(f"{env['gw'].base}/chat/completions", headers={"Authorization": f"Bearer {key}"},
                   json={"model": "tiny", "max_tokens": 400, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 402 and "may cost up to" in r.json()["error"]["message"]


def test_tokens_per_minute_hold_under_concurrency(env):
    kid, key = create_key(env["db"], "tpm", "--tpm", "300")  # room for 3 worst cases (82 tokens each)
    _wait_for_key(env["gw"].base, key)
    start = last_id(env["db"])
    codes = _burst(env["gw"].base, key, 30, workers=30)
    assert codes.count(200) >= 1 and codes.count(200) + codes.count(429) == 30, codes
    got = [g for g in rows(env["db"], start, expect=30) if g.key_id == kid and g.status == 200]
    assert sum(g.prompt_tokens + g.completion_tokens for g in got) <= 300


def test_budget_holds_across_two_gateways_sharing_postgresql(env, tmp_path):
    """The reservation is one transaction on the shared database: two gateways serving one key
    concurrently still keep its spend within the budget."""
    from pg_utils import PostgresServer

    pg = PostgresServer()
    gws = []
    try:
        cfg = gateway_config(env["replicas"], pg.url)
        gws = [start_gateway(cfg, tmp_path, f"pg-gw{i}") for i in range(2)]
        budget = 6.5 * WORST
        kid, key = create_key(pg.url, "shared", "--budget", str(budget))
        for g in gws:
            _wait_for_key(g.base, key)
        with ThreadPoolExecutor(2) as ex:
            codes = sum(ex.map(lambda g: _burst(g.base, key, 50, workers=25), gws), [])
        ok = codes.count(200)
        assert ok >= 6 and codes.count(402) == 100 - ok, codes
        got = [g for g in rows(pg.url, 0, expect=100) if g.key_id == kid]
        assert sum(g.cost for g in got) <= budget + 1e-12
    finally:
        for g in gws:
            g.stop()
        pg.stop()


def test_report_by_department(env):
    out_csv = env["tmp"] / "report.csv"
    r = cli("gateway", "report", "--db", env["db"], "--by", "department", "--since", "1h", "--csv", str(out_csv))
    assert "engineering" in r.stdout and "marketing" in r.stdout
    lines = out_csv.read_text().splitlines()
    assert lines[0].startswith("department,requests,errors,prompt_tokens,completion_tokens,cost")
    eng = next(line.split(",") for line in lines if line.startswith("engineering,"))
    with open_db(env["db"]).connect() as conn:
        n = conn.execute(select(func.count()).select_from(audit_log).where(audit_log.c.department == "engineering")).scalar()
    assert int(eng[1]) == n
    # With the config, self-hosted pools' hourly price is shared out by tokens: it sums to the price
    # of the window for pool 'local' (3.6/hour over the last 10 minutes = 0.6).
    from pagedserve.gateway.cli import report_rows

    since = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None) - dt.timedelta(minutes=10)
    by_dept = report_rows(open_db(env["db"]), "department", since, {"local": 3.6})
    assert sum(r["hosting_cost"] for r in by_dept) == pytest.approx(0.6, rel=0.01)
    r = cli("gateway", "report", "--config", str(env["tmp"] / "gateway.yaml"), "--by", "pool", "--since", "1h")
    assert "hosting_cost" in r.stdout
    bad = cli("gateway", "report", "--db", env["db"], "--since", "yesterday-ish", check=False)
    assert bad.returncode == 2 and "--since" in bad.stderr


def test_gateway_metrics(env):
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{env['gw'].url}/metrics", headers=ADMIN).text
    samples = [s for fam in text_string_to_metric_families(text) for s in fam.samples]

    def total(name, **labels):
        return sum(s.value for s in samples if s.name == name and labels.items() <= s.labels.items())

    assert total("pagedserve_gateway_requests_total", department="engineering", status="200") >= 1000
    assert total("pagedserve_gateway_tokens_total", department="engineering", model="tiny", kind="completion") > 0
    assert total("pagedserve_gateway_cost_total", department="engineering") > 0
    assert total("pagedserve_gateway_backend_healthy", pool="local", backend="r1") == 1
    assert total("pagedserve_gateway_rejected_total", reason="rate_limit_exceeded") >= 2
    assert total("pagedserve_gateway_request_latency_seconds_count", model="tiny-split") == 1000


# -- audit log exactness (SQLite and PostgreSQL), graceful shutdown ------------------------------

def _drive_and_count(base: str, key: str) -> tuple[int, int, int]:
    """A mix of streaming and non-streaming requests; returns (requests, prompt, completion) as received."""
    c = openai.OpenAI(base_url=base, api_key=key, max_retries=0, timeout=60)

    def one(i):
        if i % 3 == 0:
            chunks = list(c.completions.create(model="tiny", prompt=f"count {i} " * (i % 7 + 1), max_tokens=3 + i % 5,
                                               stream=True, stream_options={"include_usage": True}))
            u = chunks[-1].usage
        else:
            u = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"q {i}" * (i % 5 + 1)}],
                                          max_tokens=2 + i % 6).usage
        return u.prompt_tokens, u.completion_tokens

    with ThreadPoolExecutor(8) as ex:
        got = list(ex.map(one, range(60)))
    return len(got), sum(p for p, _ in got), sum(c for _, c in got)


def _audit_exact(replicas, tmp: Path, db_url: str):
    cfg = gateway_config(replicas, db_url)
    _, key = create_key(db_url, "audit")
    gw = start_gateway(cfg, tmp, "audit-gw")
    n, p, c = _drive_and_count(gw.base, key)
    assert gw.stop() == 0  # SIGTERM: the queue is drained before exit
    db = open_db(db_url)
    with db.connect() as conn:
        got = conn.execute(select(func.count(), func.sum(audit_log.c.prompt_tokens),
                                  func.sum(audit_log.c.completion_tokens)).where(audit_log.c.status == 200)).one()
    db.dispose()
    assert tuple(got) == (n, p, c)


def test_audit_log_exact_sqlite(replicas, tmp_path):
    _audit_exact(replicas, tmp_path, f"sqlite:///{tmp_path / 'exact.db'}")


def test_audit_log_exact_postgresql(replicas, tmp_path):
    from pg_utils import PostgresServer

    pg = PostgresServer()
    try:
        _audit_exact(replicas, tmp_path, pg.url)
    finally:
        pg.stop()


def test_hostile_strings_in_every_recorded_field_reach_postgresql(replicas, tmp_path):
    """Model names and prompts (logged: database.log_prompts) with NUL, lone surrogates, 100 KB
    and SQL: every request answered gets its row in PostgreSQL, and the writer keeps up after."""
    from pg_utils import PostgresServer

    pg = PostgresServer()
    try:
        cfg = gateway_config(replicas, pg.url)
        cfg["database"]["log_prompts"] = True
        gw = start_gateway(cfg, tmp_path, "hostile-gw")
        _, key = create_key(pg.url, "fuzz")
        _wait_for_key(gw.base, key)
        h = {"Authorization": f"Bearer {key}", "content-type": "application/json"}
        hostile = ['\\u0000', 'a\\u0000b', '\\ud800', '\\udfff\\ud800', "x" * 100_000, "'); DROP TABLE gateway_audit; --",
                   '\\u202e\\u0000', "\\\\x00", "\\r\\n\\t\\u001b[31m"]
        statuses = []
        for text in hostile:  # JSON escapes: the gateway's json.loads makes NUL and lone surrogates of them
            for body in ('{"model": "%s", "prompt": "p", "max_tokens": 1}' % text,
                         '{"model": "tiny", "max_tokens": 1, "messages": [{"role": "user", "content": "%s"}]}' % text):
                statuses.append(httpx.post(f"{gw.base}/chat/completions" if "messages" in body else
                                           f"{gw.base}/completions", content=body.encode(), headers=h,
                                           timeout=60).status_code)
        assert all(st in (200, 400, 404) for st in statuses), statuses
        t0 = time.monotonic()
        assert httpx.post(f"{gw.base}/completions", headers=h, timeout=60,
                          json={"model": "tiny", "prompt": "after", "max_tokens": 1}).status_code == 200
        got = rows(pg.url, 0, expect=len(statuses) + 1, timeout=60)
        visible = time.monotonic() - t0
        assert len(got) == len(statuses) + 1 and [g.status for g in got[:-1]] == statuses
        assert got[-1].prompt == "after" and not got[-1].truncated
        assert any(g.truncated and g.model and "\\x00" in g.model for g in got)
        assert any(g.truncated and g.prompt and len(g.prompt) == 16_384 for g in got)
        assert visible < 30  # nominally ~0.1 s (the flush interval)
        assert gw.stop() == 0
    finally:
        pg.stop()


# -- bad config ---------------------------------------------------------------------------------

@pytest.mark.parametrize("mutate,expect", [
    (lambda c: c["pools"][0].update(policy="fastest"), "unknown policy 'fastest'"),
    (lambda c: c["backends"][1].update(name="r1"), "duplicate backend name 'r1'"),
    (lambda c: c["backends"][3].update(api_key_env="NOT_SET_ANYWHERE"), "NOT_SET_ANYWHERE is not set"),
    (lambda c: c["models"][0].update(pool="nowhere"), "unknown pool 'nowhere'"),
    (lambda c: c["pools"][0].update(max_atempts=2), "max_atempts: Extra inputs are not permitted"),
])
def test_bad_config_names_the_line(tmp_path, mutate, expect):
    fake = {n: type("S", (), {"base": "http://127.0.0.1:9/v1"})() for n in ("r1", "r2", "r3", "provider")}
    cfg = gateway_config(fake, f"sqlite:///{tmp_path / 'x.db'}")
    mutate(cfg)
    path = tmp_path / "bad.yaml"
    text = yaml.safe_dump(cfg, sort_keys=False)
    path.write_text(text)
    r = subprocess.run([sys.executable, "-m", "pagedserve.cli", "gateway", "--config", str(path)],
                       capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PROVIDER_KEY": "x", "GW_ADMIN_KEY": "y"})
    assert r.returncode == 2, r.stderr
    msg = r.stderr.strip().splitlines()[-1]
    assert expect in msg and f"{path}:" in msg
    line = int(msg.split(f"{path}:")[1].split(":")[0])
    offending = expect.split("'")[1] if "'" in expect else expect.split()[0]
    assert offending.split(":")[0] in text.splitlines()[line - 1], (line, text.splitlines()[line - 1])


# -- faults (destructive: last) -----------------------------------------------------------------

def _load(base: str, key: str, n: int, concurrency: int = 8, stream: bool = False) -> list:
    c = openai.OpenAI(base_url=base, api_key=key, max_retries=0, timeout=60)

    def one(i):
        try:
            r = c.completions.create(model="tiny", prompt=f"load {i}", max_tokens=16, temperature=0)
            return r.usage.completion_tokens
        except Exception as e:  # counted as a failure by the caller
            return e
    with ThreadPoolExecutor(concurrency) as ex:
        return list(ex.map(one, range(n)))


def test_request_timeout_gives_504_and_an_audit_row(env):
    """server.request_timeout_s: a backend that stops answering (SIGSTOP, never ejected: health
    checks off) costs the client the limit, then 504 (an error event and [DONE] for a stream)."""
    reps, tmp = env["replicas"], env["tmp"]
    db_url = f"sqlite:///{tmp / 'timeout.db'}"
    _, key = create_key(db_url, "ops")
    cfg = {"server": {"request_timeout_s": 2}, "database": {"url": db_url, "flush_interval_s": 0.1},
           "backends": [{"name": "r3", "url": reps["r3"].base, "health_check": False}],
           "pools": [{"name": "p", "backends": ["r3"], "model": "tiny", "max_attempts": 1}],
           "models": [{"name": "tiny", "pool": "p"}]}
    gw = start_gateway(cfg, tmp, "timeout-gw")
    h = {"Authorization": f"Bearer {key}"}
    os.kill(reps["r3"].proc.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        r = httpx.post(f"{gw.base}/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 5}, headers=h,
                       timeout=30)
        assert r.status_code == 504 and "server.request_timeout_s" in r.json()["error"]["message"], r.text
        assert 1.9 < time.monotonic() - t0 < 25
        with httpx.stream("POST", f"{gw.base}/completions", headers=h, timeout=30,
                          json={"model": "tiny", "prompt": "x", "max_tokens": 5, "stream": True}) as resp:
            status, lines = resp.status_code, [ln for ln in resp.iter_lines() if ln]
        assert status == 504 or (lines[-1] == "data: [DONE]" and '"code": "timeout"' in lines[-2]), (status, lines)
    finally:
        os.kill(reps["r3"].proc.pid, signal.SIGCONT)
    got = rows(db_url, 0, expect=2)
    assert [g.status for g in got] == [504, 504] and all("request_timeout_s" in g.error for g in got)
    assert gw.stop() == 0


def test_kill_9_a_replica_under_load_loses_no_request(env):
    reps = env["replicas"]
    with ThreadPoolExecutor(1) as ex:
        fut = ex.submit(_load, env["gw"].base, env["key"], 300)
        deadline = time.monotonic() + 60
        while reps["r1"].metric("vllm:num_requests_running") < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        killed_mid_load = not fut.done()
        reps["r1"].proc.kill()  # SIGKILL while it holds requests
        results = fut.result()
    assert killed_mid_load, "the load ended before r1 was killed: the test proved nothing"
    failures = [r for r in results if not isinstance(r, int)]
    assert failures == [] and sum(results) == 300 * 16
    # The health checker ejects r1 within a few intervals (0.3 s each); the load may end first.
    deadline, available = time.monotonic() + 20, None
    while time.monotonic() < deadline:
        available = httpx.get(f"{env['gw'].url}/health").json()["pools"]["local"]["available"]
        if available == 2:
            break
        time.sleep(0.1)
    assert available == 2


def test_stream_cut_mid_way_is_continued_on_another_replica(env):
    """The replica holding a stream is killed mid-way: the gateway continues the answer on another
    replica (tests/test_gateway_resume.py checks a greedy one is the uninterrupted answer)."""
    reps, c = env["replicas"], env["client"]
    start = last_id(env["db"])
    stream = c.completions.create(model="tiny", prompt="tell me a long story", max_tokens=400, stream=True,
                                  stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    it = iter(stream)
    first = next(it)
    assert first.choices
    backend = None
    for name in ("r2", "r3"):  # whichever replica holds the stream
        m = reps[name].metric("vllm:num_requests_running")
        if m >= 1:
            backend = name
    assert backend is not None
    reps[backend].proc.kill()
    rest = list(it)
    assert rest[-1].usage.completion_tokens == 400
    assert [ch.choices[0].finish_reason for ch in rest if ch.choices][-1] == "length"
    (row,) = [g for g in rows(env["db"], start, expect=1) if g.stream]
    assert row.status == 200 and row.backend.startswith(f"{backend}>") and row.completion_tokens == 400
    env["dead"] = backend


def test_sigstop_is_routed_around_and_sigcont_returns(env):
    reps = env["replicas"]
    alive = next(n for n in ("r2", "r3") if reps[n].proc.poll() is None)
    os.kill(reps[alive].proc.pid, signal.SIGSTOP)
    try:
        # Nominally ~2.4 s (3 failed probes: 0.5 s timeouts, 0.3 s apart); the bound leaves room for
        # a loaded machine (a concurrent pip install once stretched it past 5 s).
        wait_pool_available(env, "local", 0, 10, "SIGSTOP not detected within 10 s")
        # Nothing local is available: requests overflow to the fallback provider.
        start = last_id(env["db"])
        results = _load(env["gw"].base, env["key"], 10, concurrency=2)
        assert all(isinstance(r, int) for r in results), results
        got = rows(env["db"], start, expect=10)
        assert all(g.pool == "external" and g.fallback and g.backend == "provider" for g in got)
    finally:
        os.kill(reps[alive].proc.pid, signal.SIGCONT)
    wait_pool_available(env, "local", 1, 5, "not back in the pool within 5 s of SIGCONT")
    start = last_id(env["db"])
    assert all(isinstance(r, int) for r in _load(env["gw"].base, env["key"], 4, concurrency=2))
    assert {g.backend for g in rows(env["db"], start, expect=4)} == {alive}


def test_all_primaries_down_fallback_serves_and_audit_says_so(env):
    reps = env["replicas"]
    for n in ("r1", "r2", "r3"):
        if reps[n].proc.poll() is None:
            reps[n].proc.kill()
    start = last_id(env["db"])
    results = _load(env["gw"].base, env["key"], 20, concurrency=4)
    assert all(isinstance(r, int) for r in results), results
    got = rows(env["db"], start, expect=20)
    assert len(got) == 20
    assert all(g.status == 200 and g.pool == "external" and g.fallback for g in got)
    assert all(g.cost == pytest.approx((g.prompt_tokens * 0.15 + g.completion_tokens * 0.6) / 1e6) for g in got)
    # A model whose pool has no fallback answers 503 with Retry-After, as an OpenAI error.
    r = httpx.post(f"{env['gw'].base}/completions", json={"model": "tiny-sticky", "prompt": "x", "max_tokens": 1},
                   headers={"Authorization": f"Bearer {env['key']}"})
    assert r.status_code == 503 and r.headers.get("retry-after") and "no backend" in r.json()["error"]["message"]
