"""ASGI middleware and request helpers shared by the server and the gateway (light: the gateway
imports it without the engine)."""

from __future__ import annotations

import json

from pagedserve.server.errors import error_body


def bearer_token(authorization: str | None) -> str | None:
    """The token of 'Authorization: Bearer <token>' (the scheme in any case, as RFC 7235 allows);
    None for a missing header, another scheme, or a bare token without the scheme."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class BodyLimitMiddleware:
    """413 for bodies over the limit, by Content-Length or by counting a chunked body."""

    class _TooLarge(Exception):
        pass

    def __init__(self, app, limit: int, paths: dict[str, int] | None = None):
        self.app, self.limit, self.paths = app, limit, paths or {}  # paths: a larger limit for some routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.paths.get(scope.get("path", ""), self.limit)
        for k, v in scope.get("headers", ()):
            if k == b"content-length" and v.isdigit() and int(v) > limit:
                return await self._reject(send, limit)
        received = 0
        started = False

        async def limited_receive():
            nonlocal received
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > limit:
                    raise self._TooLarge
            return msg

        async def tracking_send(msg):
            nonlocal started
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except self._TooLarge:
            if not started:
                await self._reject(send, limit)

    async def _reject(self, send, limit: int):
        flag = "--max-request-body-bytes" if limit == self.limit else "--max-batch-file-bytes"
        body = json.dumps(error_body(413, f"request body is larger than the limit of {limit} bytes ({flag})")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
