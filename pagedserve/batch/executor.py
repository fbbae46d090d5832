"""Where a batch line runs.

`AppExecutor` sends it to the server's own FastAPI app in-process (httpx's ASGI transport: no
socket, no second copy of the endpoint logic), so a batch line gets exactly the validation,
defaults and response body of the same request sent over HTTP. `HTTPExecutor` sends it to a
running server or gateway by URL (`pagedserve run-batch --url`).

Both set the request's priority to the batch priority (the engine serves lower values first):
interactive requests (priority 0) go ahead of batch lines in every step and are never preempted
for them. A line's own priority is kept when it is lower still (later).
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx

from pagedserve.batch.lines import BatchLine

RETRY_S = 300.0  # how long a line is retried while the server answers 429 / 503


def with_priority(body: dict, priority: int) -> dict:
    try:
        own = int(body.get("priority", 0))
    except (TypeError, ValueError):  # the endpoint reports the bad field
        return body
    return {**body, "priority": max(own, priority)}


async def retrying(call) -> tuple[int, object, str | None]:
    """`call()` -> (status, body, request id), again with backoff while it answers 429 or 503 (a
    full queue, a rate limit, no replica up), for up to RETRY_S: a busy moment of interactive
    traffic or a replica's restart must not fail batch lines that would run a second later."""
    deadline = time.monotonic() + RETRY_S
    delay = 0.05
    while True:
        out = await call()
        if out[0] not in (429, 503) or time.monotonic() + delay > deadline:
            return out
        await asyncio.sleep(delay)
        delay = min(2 * delay, 2.0)


class CallExecutor:
    """A line run by `fn(owner, batch_id, line)` (the gateway's own request path), with retries."""

    def __init__(self, fn):
        self.fn = fn

    async def run(self, line: BatchLine, owner: str | None = None, batch_id: str | None = None):
        return await retrying(lambda: self.fn(owner, batch_id, line))

    async def close(self) -> None:
        pass


class _Executor:
    def __init__(self, client: httpx.AsyncClient, priority: int, api_key: str | None):
        self.client = client
        self.priority = priority
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    async def run(self, line: BatchLine, owner: str | None = None, batch_id: str | None = None):
        """(status code, response body, request id) of one line (owner and batch_id: the gateway's)."""
        return await retrying(lambda: self._post(line))

    async def _post(self, line: BatchLine) -> tuple[int, object, str | None]:
        r = await self.client.post(line.url, json=with_priority(line.body, self.priority),
                                   headers=self.headers)
        try:
            body = r.json()
        except json.JSONDecodeError:
            body = {"error": {"message": r.text[:2000], "type": "invalid_response"}}
        rid = body.get("id") if isinstance(body, dict) and isinstance(body.get("id"), str) else None
        return r.status_code, body, rid

    async def close(self) -> None:
        await self.client.aclose()


class AppExecutor(_Executor):
    def __init__(self, app, priority: int = 0, api_key: str | None = None):
        super().__init__(httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://batch.local",
                                           timeout=None), priority, api_key)


class HTTPExecutor(_Executor):
    """`base_url`: the server's root or its /v1 URL."""

    def __init__(self, base_url: str, priority: int = 0, api_key: str | None = None, timeout: float = 3600.0):
        root = base_url.rstrip("/").removesuffix("/v1")
        super().__init__(httpx.AsyncClient(base_url=root, timeout=timeout,
                                           limits=httpx.Limits(max_connections=None, max_keepalive_connections=64)),
                         priority, api_key)
