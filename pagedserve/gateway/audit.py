"""The audit log writer: rows go into a bounded queue; one task writes them in batches on a thread.

The request path only enqueues (after the response is complete), so database latency never
reaches a client. Nothing a client sends can stop it:
- every row is made storable before it is queued (`storable`): strings bounded to their column,
  NUL and text that is not valid UTF-8 escaped, integers clamped to the column's range, and the
  row's `truncated` flag set when anything was cut or escaped;
- a batch the database still refuses for its data is split until the refused row is alone; that
  row is written in a reduced form (numbers and status kept, strings dropped, the reason in
  `error`), and dropped only if even that fails; both are counted in metrics;
- a batch that fails because the database is unreachable is retried with back-off, and its rows
  are kept meanwhile.
The queue is bounded; when it is full, a bounded number of rows wait for space and beyond that
rows are dropped and counted, so memory and tasks stay bounded whatever the database does.
`close()` drains within a bounded time and says how many rows it could not write.
"""

from __future__ import annotations

import asyncio
import logging
import time

from sqlalchemy import Integer, String, Text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine

from pagedserve.gateway.store import audit_log

log = logging.getLogger("pagedserve.gateway.audit")

TEXT_LIMIT = 16_384  # characters kept of a Text column (error, prompt); String(n) columns keep n
INT_MAX = 2**31 - 1  # the Integer columns are 32-bit in PostgreSQL
_STRINGS = {c.name: (c.type.length or TEXT_LIMIT) for c in audit_log.columns if isinstance(c.type, (String, Text))}
_INTS = {c.name for c in audit_log.columns if isinstance(c.type, Integer) and c.name != "id"}
# Columns a reduced row keeps: what the request cost and how it ended, never client-supplied text.
_REDUCED = ("ts", "key_id", "endpoint", "attempts", "fallback", "stream", "prompt_tokens", "completion_tokens",
            "cost", "ttft_s", "latency_s", "status", "batch_id")


def clean_text(s: str, limit: int) -> tuple[str, bool]:
    """`s` as any database stores it: invalid UTF-8 (lone surrogates) and NUL escaped as text,
    at most `limit` characters; and whether it had to change."""
    orig = s
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        s = s.encode("utf-8", "backslashreplace").decode("utf-8")
    if "\x00" in s:
        s = s.replace("\x00", "\\x00")
    if len(s) > limit:
        s = s[:limit]
    return s, s != orig


def storable(row: dict) -> dict:
    """A copy of an audit row that fits the table, with `truncated` set if anything was cut."""
    out, cut = dict(row), bool(row.get("truncated"))
    for name, limit in _STRINGS.items():
        v = out.get(name)
        if v is None:
            continue
        if not isinstance(v, str):
            v = str(v)
        out[name], c = clean_text(v, limit)
        cut |= c
    for name in _INTS:
        v = out.get(name)
        if isinstance(v, int) and not 0 <= v <= INT_MAX:
            out[name], cut = min(max(v, 0), INT_MAX), True
    out["truncated"] = cut
    return out


def reduced(row: dict, why: BaseException) -> dict:
    out = {k: row.get(k) for k in _REDUCED}
    out.update(truncated=True, error=f"audit row reduced: the database refused it ({type(why).__name__})")
    return out


def _unreachable(e: BaseException) -> bool:
    """The database is down or busy (retry), as opposed to refusing these rows' data (split)."""
    return isinstance(e, (sa_exc.OperationalError, sa_exc.DisconnectionError,
                          ConnectionError, TimeoutError)) or getattr(e, "connection_invalidated", False)


class AuditWriter:
    def __init__(self, db: Engine, queue_size: int = 10_000, batch_size: int = 200, flush_interval_s: float = 0.5,
                 metrics=None):
        self.db, self.batch_size, self.flush_interval_s = db, batch_size, flush_interval_s
        self.queue: asyncio.Queue[dict] = asyncio.Queue(maxsize=queue_size)
        self.max_waiting = queue_size  # rows waiting for queue space, beyond the queue itself
        self.waiting = 0
        self.metrics = metrics
        self.written = self.reduced = self.dropped = 0
        self._task: asyncio.Task | None = None
        self._closing = False
        self._give_up_at = float("inf")  # set by close(): stop retrying an unreachable database then
        self._last_drop_log = 0.0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="audit-writer")

    def submit(self, row: dict, background) -> None:
        """Queue a row without blocking; when the queue is full, wait for space in a background task
        (`background(coro)`), at most `max_waiting` of them; beyond that the row is dropped, counted."""
        row = storable(row)
        try:
            self.queue.put_nowait(row)
            return
        except asyncio.QueueFull:
            pass
        if self.waiting >= self.max_waiting:
            self._drop(1, "queue_full")
            return
        self.waiting += 1
        background(self._put_waiting(row))

    async def _put_waiting(self, row: dict) -> None:
        try:
            await self.queue.put(row)
        finally:
            self.waiting -= 1

    def _drop(self, n: int, reason: str) -> None:
        self.dropped += n
        if self.metrics is not None:
            self.metrics.audit_dropped.labels(reason).inc(n)
        now = time.monotonic()
        if now - self._last_drop_log > 10:  # at most one line per 10 s, however many rows
            self._last_drop_log = now
            log.error("audit log: dropped %d row(s) (%s); %d dropped since start", n, reason, self.dropped)

    def _insert(self, rows: list[dict]) -> None:
        with self.db.begin() as conn:
            conn.execute(audit_log.insert(), rows)

    async def _write(self, rows: list[dict]) -> None:
        """Write `rows`; retry while the database is unreachable, isolate rows it refuses."""
        delay = 0.5
        while True:
            try:
                await asyncio.to_thread(self._insert, rows)
                self.written += len(rows)
                return
            except Exception as e:
                err = e
                if not _unreachable(e):
                    break
                if time.monotonic() + delay > self._give_up_at:
                    self._drop(len(rows), "shutdown")
                    return
                log.error("audit write of %d rows failed (%s); retrying in %.1fs", len(rows),
                          str(e).splitlines()[0][:200], delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
        if len(rows) > 1:  # the database refused some row's data: find it, keep the rest
            mid = len(rows) // 2
            await self._write(rows[:mid])
            await self._write(rows[mid:])
            return
        row, why = rows[0], err
        log.error("audit row refused by the database (%s); writing it reduced", str(why).splitlines()[0][:200])
        try:
            await asyncio.to_thread(self._insert, [reduced(row, why)])
        except Exception as e2:
            log.error("audit row could not be written even reduced (%s); dropped", str(e2).splitlines()[0][:200])
            self._drop(1, "refused")
            return
        self.written += 1
        self.reduced += 1
        if self.metrics is not None:
            self.metrics.audit_reduced.inc()

    async def _run(self) -> None:
        while True:
            try:
                first = await asyncio.wait_for(self.queue.get(), timeout=self.flush_interval_s)
            except asyncio.TimeoutError:
                if self._closing:
                    return
                continue
            rows = [first]
            while len(rows) < self.batch_size and not self.queue.empty():
                rows.append(self.queue.get_nowait())
            await self._write(rows)

    async def close(self, timeout: float = 30.0) -> int:
        """Write everything still queued, for at most `timeout` seconds; returns the rows lost."""
        self._closing = True
        self._give_up_at = time.monotonic() + timeout
        before = self.dropped
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout + 1)
            except asyncio.TimeoutError:
                self._task.cancel()
        left = self.queue.qsize() + self.waiting
        if left:
            self._drop(left, "shutdown")
        lost = self.dropped - before
        if lost:
            log.error("audit log closed: %d rows written, %d could NOT be written (database unreachable)",
                      self.written, lost)
        else:
            log.info("audit log closed: %d rows written", self.written)
        return lost
