"""The audit log writer: rows go into a bounded queue; one task writes them in batches on a thread.

The request path only enqueues (after the response is complete), so database latency never
reaches a client. If the database falls so far behind that the queue fills, enqueuing waits
rather than dropping rows. `close()` drains the queue, so a graceful shutdown loses nothing; a
failed batch is retried with back-off and its rows are kept meanwhile.
"""

from __future__ import annotations

import asyncio
import logging

from sqlalchemy.engine import Engine

from pagedserve.gateway.store import audit_log

log = logging.getLogger("pagedserve.gateway.audit")


class AuditWriter:
    def __init__(self, db: Engine, queue_size: int = 10_000, batch_size: int = 200, flush_interval_s: float = 0.5):
        self.db, self.batch_size, self.flush_interval_s = db, batch_size, flush_interval_s
        self.queue: asyncio.Queue[dict] = asyncio.Queue(maxsize=queue_size)
        self.written = 0
        self._task: asyncio.Task | None = None
        self._closing = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="audit-writer")

    async def put(self, row: dict) -> None:
        await self.queue.put(row)

    def _insert(self, rows: list[dict]) -> None:
        with self.db.begin() as conn:
            conn.execute(audit_log.insert(), rows)

    async def _write(self, rows: list[dict]) -> None:
        delay = 0.5
        while True:
            try:
                await asyncio.to_thread(self._insert, rows)
                self.written += len(rows)
                return
            except Exception as e:  # database down: keep the rows, try again
                log.error("audit write of %d rows failed (%s); retrying in %.1fs", len(rows), e, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

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

    async def close(self) -> None:
        """Write everything still queued, then stop."""
        self._closing = True
        if self._task is not None:
            await self._task
        rows = []
        while not self.queue.empty():
            rows.append(self.queue.get_nowait())
        if rows:
            await self._write(rows)
        log.info("audit log closed: %d rows written", self.written)
