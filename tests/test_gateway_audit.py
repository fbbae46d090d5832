"""The audit writer cannot be stopped by what a client sends: hostile strings are made storable,
a row the database still refuses is isolated and written reduced, everyone else's rows keep
flowing, and shutdown is bounded when the database is gone. On real SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import datetime as dt
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from pagedserve.gateway.audit import AuditWriter, storable
from pagedserve.gateway.metrics import GatewayMetrics
from pagedserve.gateway.store import audit_log, open_db

HOSTILE = ["\x00", "a\x00b", "\ud800", "x" * 100_000, "'; DROP TABLE gateway_audit; --", "\u202e\u0000\U0001f600",
           "\\x00", "\r\n\t\x1b[31m", "é" * 300]


def row(i: int, **over) -> dict:
    r = dict(ts=dt.datetime(2026, 12, 2, 12, 0, 0), key_id="k1", department="eng", model=f"m{i}",
             endpoint="chat/completions", route=None, pool="p", backend="b", attempts=1, fallback=False, stream=False,
             prompt_tokens=3, completion_tokens=4, cost=0.001, ttft_s=None, latency_s=0.5, status=200, error=None,
             prompt=None)
    r.update(over)
    return r


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'audit.db'}"
        return
    from pg_utils import PostgresServer

    pg = PostgresServer()
    try:
        yield pg.url
    finally:
        pg.stop()


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["model", "department", "route", "pool", "backend", "error", "prompt",
                                        "key_id", "endpoint"]), st.text(max_size=400) | st.sampled_from(HOSTILE)),
       st.integers(min_value=-2**70, max_value=2**70))
def test_storable_bounds_every_string_and_int(fields, n):
    out = storable(row(0, prompt_tokens=n, **fields))
    for name, v in out.items():
        if isinstance(v, str):
            assert "\x00" not in v
            v.encode("utf-8")  # valid text
            col = audit_log.c[name]
            assert len(v) <= (col.type.length or 16_384)
    assert 0 <= out["prompt_tokens"] <= 2**31 - 1
    changed = any(isinstance(fields[k], str) and out[k] != fields[k] for k in fields) or out["prompt_tokens"] != n
    assert out["truncated"] == changed


def total(counter) -> float:
    return sum(s.value for s in counter.collect()[0].samples if s.name.endswith("_total"))


def _rows(url: str) -> list:
    db = open_db(url)
    with db.connect() as conn:
        got = conn.execute(select(audit_log).order_by(audit_log.c.id)).all()
    db.dispose()
    return got


def test_hostile_and_refused_rows_never_stop_the_writer(db_url):
    """Hostile values in every text field are stored (escaped, cut, flagged); rows put on the
    queue *without* being made storable (what a bug elsewhere could do) are refused by the
    database, isolated, and written reduced; rows after them keep flowing."""
    m = GatewayMetrics()

    async def main():
        w = AuditWriter(open_db(db_url), queue_size=1000, batch_size=50, flush_interval_s=0.05, metrics=m)
        w.start()
        bg = set()
        for i in range(40):
            hostile = HOSTILE[i % len(HOSTILE)]
            w.submit(row(i, model=hostile, error=hostile, prompt=hostile, route=hostile), bg.add)
        # Straight onto the queue, past storable(): NUL and over-long text (PostgreSQL refuses
        # both), a value of no SQL type (SQLite and PostgreSQL refuse it).
        for bad in ({"model": "nul\x00here"}, {"model": "y" * 5000}, {"prompt": object()}):
            w.queue.put_nowait(row(100, **bad))
        for i in range(40, 60):
            w.submit(row(i), bg.add)
        t0 = time.monotonic()
        while w.written < 63 and time.monotonic() - t0 < 60:
            await asyncio.sleep(0.05)
        lost = await w.close(5)
        return w, lost

    w, lost = asyncio.run(main())
    assert lost == 0 and w.dropped == 0
    got = _rows(db_url)
    assert len(got) == 63
    assert [g.model for g in got if g.model and g.model.startswith("m")][-20:] == [f"m{i}" for i in range(40, 60)]
    stored = [g for g in got if g.error and not g.error.startswith("audit row reduced")]
    assert len(stored) == 40
    cut = [storable(row(0, model=h, error=h, prompt=h, route=h))["truncated"] for h in HOSTILE]
    assert [bool(g.truncated) for g in stored] == [cut[i % len(HOSTILE)] for i in range(40)]
    assert any(g.model == "a\\x00b" for g in stored) and any(g.model == "\\ud800" for g in stored)
    assert max(len(g.prompt) for g in stored) == 16_384
    red = [g for g in got if g.error and g.error.startswith("audit row reduced")]
    assert 1 <= len(red) <= 3 and all(g.model is None and g.prompt is None and g.status == 200 for g in red)
    assert w.reduced == len(red)
    assert total(m.audit_reduced) == len(red)


def test_shutdown_is_bounded_when_the_database_is_gone(tmp_path):
    """PostgreSQL stopped under the writer: rows are retried while it runs, and close() gives up
    after its timeout and says how many rows it could not write (it waited forever before)."""
    from pg_utils import PostgresServer

    pg = PostgresServer()
    m = GatewayMetrics()

    async def main():
        w = AuditWriter(open_db(pg.url), queue_size=100, batch_size=10, flush_interval_s=0.05, metrics=m)
        w.start()
        w.submit(row(0), None)
        while w.written < 1:
            await asyncio.sleep(0.05)
        pg.stop()
        for i in range(1, 26):
            w.submit(row(i), None)
        await asyncio.sleep(0.5)
        t0 = time.monotonic()
        lost = await w.close(2)
        return lost, time.monotonic() - t0, w

    try:
        lost, took, w = asyncio.run(main())
    finally:
        pg.stop()
    assert lost == 25 and w.dropped == 25
    assert took < 30  # the bound is 2 s plus one back-off step; generous for a loaded machine
    assert total(m.audit_dropped) == 25


def test_a_full_queue_bounds_waiting_rows_and_counts_drops():
    async def main():
        w = AuditWriter(open_db("sqlite://"), queue_size=2, batch_size=1, flush_interval_s=10)
        tasks = []
        for i in range(10):  # writer not started: the queue fills, 2 wait, the rest are dropped
            w.submit(row(i), lambda coro: tasks.append(asyncio.ensure_future(coro)))
        assert (w.queue.qsize(), w.waiting, w.dropped) == (2, 2, 6)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(main())
