"""Run the lines of one batch: at most `concurrency` in flight, each result handed to `record` as
it finishes (the store commits it there), lines already done skipped. `stop` ends it early
(cancel, expiry, shutdown): no new line starts, the ones in flight are cancelled (their engine
requests abort), and what finished stays recorded."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from pagedserve.batch.lines import BatchLine, error_line, output_line


async def run_line(execute, line: BatchLine) -> tuple[bool, dict]:
    """(ok, output line) for one line; a transport failure is an error line, never an exception."""
    try:
        status, body, rid = await execute(line)
    except asyncio.CancelledError:
        raise
    except Exception as e:  # noqa: BLE001 - one line's failure must not stop the batch
        return False, error_line(line.custom_id, "request_failed", f"{type(e).__name__}: {str(e)[:500]}")
    return 200 <= status < 300, output_line(line.custom_id, status, body, rid)


async def run_lines(lines: list[BatchLine], execute: Callable[[BatchLine], Awaitable], concurrency: int,
                    record: Callable[[BatchLine, bool, dict], None], stop: asyncio.Event | None = None) -> bool:
    """True when every line ran, False when `stop` ended it first."""
    stop = stop or asyncio.Event()
    todo = iter(lines)
    running: set[asyncio.Task] = set()
    owner: dict[asyncio.Task, BatchLine] = {}
    stopper = asyncio.ensure_future(stop.wait())
    try:
        while True:
            while len(running) < concurrency and not stop.is_set():
                line = next(todo, None)
                if line is None:
                    break
                t = asyncio.ensure_future(run_line(execute, line))
                running.add(t)
                owner[t] = line
            if not running:
                return not stop.is_set()
            done, _ = await asyncio.wait(running | {stopper}, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t is stopper:
                    continue
                running.discard(t)
                ok, result = t.result()
                record(owner.pop(t), ok, result)
            if stop.is_set():
                return False
    finally:
        stopper.cancel()
        for t in running:
            t.cancel()
        if running:
            await asyncio.gather(*running, return_exceptions=True)
