"""Waiting for outputs: whole responses (`collect`), interleaved streams (`merged`), SSE framing
with the request timeout and in-band errors (`stream_events`), and the latency metrics."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable

from fastapi import Request

from pagedserve.engine.async_engine import EngineDeadError
from pagedserve.engine.outputs import RequestOutput
from pagedserve.server.context import ServingContext
from pagedserve.server.errors import APIError, error_body


async def collect(ctx: ServingContext, raw: Request, streams: list[AsyncIterator]) -> list[RequestOutput]:
    """Wait for every final output; abort all if the client leaves or the timeout passes."""

    async def last(it):
        out = None
        async for out in it:
            pass
        return out

    tasks = [asyncio.ensure_future(last(s)) for s in streams]
    timeout = ctx.settings.request_timeout
    deadline = time.monotonic() + timeout
    try:
        while True:
            done, pending = await asyncio.wait(tasks, timeout=0.5, return_when=asyncio.ALL_COMPLETED)
            if not pending:
                break
            if await raw.is_disconnected():
                raise APIError(499, "client disconnected")
            if time.monotonic() > deadline:
                raise APIError(504, f"request timed out after {timeout:.0f}s (--request-timeout)")
        outs = [t.result() for t in tasks]
    finally:
        for t in tasks:
            t.cancel()  # closes the generators, which aborts unfinished requests
    m = ctx.metrics
    for o in outs:
        m.observe_finished(o.metrics)
        for c in o.outputs:
            n = len(c.token_ids)
            if n > 1 and o.metrics.first_token_time and o.metrics.last_token_time:
                gap = (o.metrics.last_token_time - o.metrics.first_token_time) / (n - 1)
                for _ in range(n - 1):
                    m.itl.observe(gap)
    return outs


async def merged(streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several requests' outputs as they come, tagged with the prompt index."""
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i, it):
        try:
            async for out in it:
                await q.put((i, out))
        except BaseException as e:
            await q.put((i, e))
        finally:
            await q.put((i, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        live = len(tasks)
        while live:
            i, item = await q.get()
            if item is None:
                live -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


def sse(obj) -> str:
    data = obj.model_dump_json(exclude_unset=False) if hasattr(obj, "model_dump_json") else json.dumps(obj)
    return f"data: {data}\n\n"


_SENTINEL = "\ue000pagedserve-text\ue000"  # private-use characters: no JSON encoder escapes them


class TextChunk:
    """The SSE event of a stream's most common chunk, one choice carrying nothing but new text:
    serialized by pydantic once per stream (with a sentinel for the text), then filled in per
    token. Building and dumping the pydantic models was ~0.3 ms of the event loop's time a token
    (py-spy, c=1), CPU the engine's threads then wait for on a 2-core box. The event is the same
    JSON document pydantic writes (tests/test_streaming_chunks.py checks it for awkward text)."""

    def __init__(self, make: Callable[[str], object]):
        self.make = make
        data = sse(make(_SENTINEL))
        quoted = json.dumps(_SENTINEL, ensure_ascii=False)
        self.parts = data.split(quoted) if data.count(quoted) == 1 else None

    def __call__(self, text: str) -> str:
        if self.parts is None:  # the sentinel did not come out once, as itself: no shortcut
            return sse(self.make(text))
        return json.dumps(text, ensure_ascii=False).join(self.parts)


async def stream_events(ctx: ServingContext, gen: AsyncIterator[str]) -> AsyncIterator[str]:
    """Wrap an SSE generator: enforce the timeout and turn failures into an error event."""
    deadline = time.monotonic() + ctx.settings.request_timeout
    try:
        async for chunk in gen:
            yield chunk
            if time.monotonic() > deadline:
                yield f"data: {json.dumps(error_body(504, 'request timed out (--request-timeout)'))}\n\n"
                break
    except (EngineDeadError, ValueError, APIError) as e:
        status = 503 if isinstance(e, EngineDeadError) else 400
        yield f"data: {json.dumps(error_body(status, str(e)))}\n\n"
    finally:
        await gen.aclose()
    yield "data: [DONE]\n\n"


def observe_stream(ctx: ServingContext, o: RequestOutput, last_times: dict, key) -> None:
    now = time.monotonic()
    for c in o.outputs:
        k = (key, c.index)
        if k in last_times and c.token_ids:
            gap = (now - last_times[k]) / len(c.token_ids)
            for _ in c.token_ids:
                ctx.metrics.itl.observe(gap)
        last_times[k] = now
    if o.finished:
        ctx.metrics.observe_finished(o.metrics)
