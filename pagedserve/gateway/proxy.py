"""Forwarding one request: pick a backend, retry before the first byte, overflow to fallback pools,
relay streams event by event.

Retry rules. A connection error, a timeout, a 5xx or a 429 from a backend *before anything has
been sent to the client* is retried on another backend of the pool (at most `max_attempts`
backends). Non-streaming responses are read whole before the client sees a byte, so a replica
that dies mid-generation is retried too. A stream is committed once its first event arrives;
after that a failure ends the stream with an error event and is never retried silently.
A pool that has no available backend, is saturated, or exhausted its attempts overflows to its
`fallback` pool (following the chain, never revisiting a pool).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import aiohttp
from fastapi.responses import Response, StreamingResponse

from pagedserve.gateway.backends import Backend, Pool
from pagedserve.gateway.metrics import GatewayMetrics
from pagedserve.gateway.policies import RequestInfo, RoutingPolicy
from pagedserve.gateway.resume import Sent, client_event, continuation_body, resumable, strip_ids, usage_event
from pagedserve.server.errors import APIError, error_body

log = logging.getLogger("pagedserve.gateway")

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
# aiohttp, not httpx, on the proxy path: measured here at ~1.2 ms of CPU per streamed request vs
# ~2.5-3.5 ms for httpx, which is most of what a gateway adds.
UPSTREAM_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError)


@dataclass
class Resume:
    """What continuing a broken stream needs (resume.py)."""
    endpoint: str
    body: dict  # as the client sent it
    public_model: str
    pool: Pool
    info: RequestInfo
    client_wants_ids: bool  # the client asked for return_token_ids itself: keep them in its events


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Trace:
    """What happened to one request; becomes its audit row."""
    pool: str | None = None
    backend: str | None = None
    attempts: int = 0
    fallback: bool = False
    status: int = 0
    error: str | None = None
    ttft_s: float | None = None
    usage: Usage = field(default_factory=Usage)
    t0: float = field(default_factory=time.monotonic)  # when the request arrived
    deadline: float = float("inf")  # server.request_timeout_s after t0
    reserved_tokens: int = 0  # worst-case tokens held in the key's TPM window until finish()
    reservation: object | None = None  # the key's budget reservation (keys.Reservation) until finish()

    def expired(self) -> bool:
        return time.monotonic() >= self.deadline

    def ran_out(self, e: BaseException) -> bool:
        """Whether an upstream error is this request's own limit rather than the backend's fault.
        aiohttp's total timer (set from the deadline in _post) is the only source of a bare
        TimeoutError: its connect and read timers raise subclasses. The type decides, because
        the clock can't: under uvloop the timer is scheduled on the loop's cached millisecond
        time, so it may fire a few ms (more on a loaded box) before time.monotonic() reaches
        the deadline."""
        return type(e) is TimeoutError or self.expired()


def _timed_out(trace: Trace) -> APIError:
    return APIError(504, f"the request did not complete within the gateway's limit of {trace.deadline - trace.t0:g}s "
                         "(server.request_timeout_s)", code="timeout")


class _Failed(Exception):
    def __init__(self, reason: str, response: Response | None = None):
        super().__init__(reason)
        self.reason, self.response = reason, response


# The response's top-level "model": the first such key (inside string values quotes are escaped,
# so generated text cannot match). Replaced by the public name the client asked for, not the
# upstream's name (a provider's dated model id, a pool's internal name).
_MODEL_FIELD = re.compile(rb'"model"\s*:\s*"(?:[^"\\]|\\.)*"')


def _public_model(data: bytes, public: bytes) -> bytes:
    if public in data:  # the upstream already says it (pagedserve and vLLM echo the name sent)
        return data
    return _MODEL_FIELD.sub(lambda _: public, data, count=1)


def _usage_of(obj: dict) -> Usage | None:
    u = obj.get("usage")
    if isinstance(u, dict):
        return Usage(int(u.get("prompt_tokens") or 0), int(u.get("completion_tokens") or 0))
    return None


def _has_content(obj: dict) -> bool:
    for c in obj.get("choices") or ():
        if c.get("text") or (c.get("delta") or {}).get("content"):
            return True
    return False


class _Unresumable(Exception):
    pass


def _model_field(public_model: str) -> bytes:
    return b'"model":' + json.dumps(public_model).encode()


class Forwarder:
    def __init__(self, client: aiohttp.ClientSession, pools: dict[str, Pool], policies: dict[str, RoutingPolicy],
                 metrics: GatewayMetrics):
        self.client, self.pools, self.policies, self.metrics = client, pools, policies, metrics
        self._bg: set[asyncio.Task] = set()

    async def drain(self) -> None:
        """Wait for the background work still running (audit rows waiting for queue space)."""
        await asyncio.gather(*list(self._bg), return_exceptions=True)

    def background(self, coro) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._bg.add(t)
        t.add_done_callback(self._bg.discard)

    async def forward(self, endpoint: str, body: dict, public_model: str, pool_name: str, info: RequestInfo,
                      trace: Trace, on_done: Callable[[Trace], None]) -> Response:
        """Send the request; `on_done(trace)` is called exactly once when the response is complete."""
        stream = bool(body.get("stream"))
        pool: Pool | None = self.pools[pool_name]
        visited: list[str] = []
        last: _Failed | None = None
        while pool is not None:
            visited.append(pool.name)
            tried: set[str] = set()
            reason = None
            candidates = pool.available()
            if not candidates:
                reason = "down"
            elif pool.saturated(candidates):
                reason = "saturated"
            else:
                for _ in range(pool.cfg.max_attempts):
                    if trace.expired():
                        raise _timed_out(trace)
                    candidates = [b for b in pool.available() if b.name not in tried]
                    if not candidates:
                        break
                    backend = self.policies[pool.name].choose(candidates, info)
                    tried.add(backend.name)
                    trace.attempts += 1
                    trace.pool, trace.backend = pool.name, backend.name
                    try:
                        return await self._attempt(endpoint, body, public_model, pool, backend, stream, trace, on_done,
                                                   info)
                    except _Failed as f:
                        last = f
                        self.metrics.retries.labels(pool.name, f.reason.split(":")[0]).inc()
                        log.warning("pool %s backend %s failed before the first byte: %s", pool.name, backend.name,
                                    f.reason)
                reason = "failed"
            nxt = pool.cfg.fallback
            if nxt is None or nxt in visited:
                break
            log.info("pool %s is %s; overflowing to %s", pool.name, reason, nxt)
            self.metrics.fallbacks.labels(pool.name, nxt, reason).inc()
            trace.fallback = True
            pool = self.pools[nxt]
        if last is not None and last.response is not None:  # every backend answered an error: pass the last on
            trace.status, trace.error = last.response.status_code, last.reason
            on_done(trace)
            return last.response
        if last is not None:
            trace.status, trace.error = 502, f"all attempts failed; last: {last.reason}"
            on_done(trace)
            raise APIError(502, f"no backend could serve the request ({trace.attempts} attempts over pools "
                                f"{', '.join(visited)}); last error: {last.reason}")
        trace.status, trace.error = 503, f"no available backend in pools {', '.join(visited)}"
        on_done(trace)
        raise APIError(503, f"no backend is available for model {public_model!r} (pools {', '.join(visited)} are "
                            "down or saturated); try again shortly", headers={"Retry-After": "1"})

    def _post(self, b: Backend, pool: Pool, endpoint: str, payload: dict, trace: Trace):
        """POST to a backend: its key, the pool's connect/read timeouts, and as total what is left
        of server.request_timeout_s (aiohttp enforces it on every read, for free)."""
        headers = {"content-type": "application/json"}
        if b.api_key:
            headers["authorization"] = f"Bearer {b.api_key}"
        c, left = pool.cfg, trace.deadline - time.monotonic()
        timeout = aiohttp.ClientTimeout(total=left if left != float("inf") else None,
                                        sock_connect=c.connect_timeout_s, sock_read=c.read_timeout_s)
        return self.client.post(f"{b.url}/{endpoint}", data=json.dumps(payload).encode(), headers=headers,
                                timeout=timeout)

    async def _attempt(self, endpoint, body, public_model, pool: Pool, b: Backend, stream: bool, trace: Trace,
                       on_done, info: RequestInfo | None = None) -> Response:
        payload = dict(body)
        payload["model"] = b.model or pool.cfg.model or public_model
        client_wants_usage = True
        resume = None
        if stream:
            so = dict(payload.get("stream_options") or {})
            client_wants_usage = bool(so.get("include_usage"))
            so["include_usage"] = True  # so the audit log gets exact token counts
            payload["stream_options"] = so
            if pool.cfg.continue_streams and resumable(body):
                payload["return_token_ids"] = True  # what the client has, should the stream break
                resume = Resume(endpoint, body, public_model, pool, info or RequestInfo(),
                                bool(body.get("return_token_ids")))
        b.outstanding += 1
        try:
            resp = await self._post(b, pool, endpoint, payload, trace)
        except UPSTREAM_ERRORS as e:
            b.outstanding -= 1
            if trace.ran_out(e):  # our limit, not the backend's fault
                raise _timed_out(trace) from None
            b.record_failure(type(e).__name__)
            raise _Failed(f"{type(e).__name__}: {e}") from None
        try:
            if resp.status in RETRY_STATUSES:
                try:
                    content = await resp.read()
                except UPSTREAM_ERRORS:
                    content = b""
                if resp.status >= 500:
                    b.record_failure(f"HTTP {resp.status}")
                raise _Failed(f"HTTP {resp.status}: {content[:200].decode(errors='replace')}",
                              Response(content, resp.status, media_type=resp.headers.get("content-type"),
                                       headers={k: v for k, v in resp.headers.items() if k.lower() == "retry-after"}))
            if not stream or resp.status != 200:
                try:
                    content = await resp.read()
                except UPSTREAM_ERRORS as e:
                    if trace.ran_out(e):
                        raise _timed_out(trace) from None
                    b.record_failure(type(e).__name__)
                    raise _Failed(f"{type(e).__name__} while reading the response: {e}") from None
                b.record_success()
                trace.status = resp.status
                if resp.status == 200:
                    try:
                        trace.usage = _usage_of(json.loads(content)) or Usage()
                    except ValueError:
                        pass
                else:
                    trace.error = content[:500].decode(errors="replace")
                b.outstanding -= 1
                resp.release()
                on_done(trace)
                if resp.status == 200:
                    content = _public_model(content, _model_field(public_model))
                return Response(content, resp.status, media_type=resp.headers.get("content-type"))
            try:
                first = await resp.content.readany()
            except UPSTREAM_ERRORS as e:
                if trace.ran_out(e):
                    raise _timed_out(trace) from None
                first, why = b"", type(e).__name__
            else:
                why = "EOF"
            if not first:
                b.record_failure(why)
                raise _Failed(f"stream ended before its first event: {why}") from None
            b.record_success()
        except BaseException:
            b.outstanding -= 1
            resp.close()
            raise
        return StreamingResponse(self._relay(first, resp, b, trace, client_wants_usage, on_done,
                                             _model_field(public_model), resume),
                                 media_type="text/event-stream", headers={"x-pagedserve-backend": b.name})

    async def _relay(self, first: bytes, resp: aiohttp.ClientResponse, b: Backend,
                     trace: Trace, client_wants_usage: bool, on_done, model_field: bytes,
                     resume: Resume | None = None) -> AsyncIterator[bytes]:
        """Pass events through as they arrive; read usage on the way; drop the usage event the client
        did not ask for; on an upstream failure after text was sent, continue the answer on another
        backend (resume.py), or end with an error event."""
        buf = b""
        seen_content = completed = done_sent = False
        sent: list[bytes] = []  # data events the client has (when the stream can be resumed)
        trace.status = 200
        try:
            chunk: bytes | None = first
            while chunk is not None:
                buf += chunk.replace(b"\r\n", b"\n")
                *events, buf = buf.split(b"\n\n")
                for ev in events:
                    if not ev.startswith(b"data:") or ev.startswith(b"data: [DONE]"):
                        done_sent = done_sent or ev.startswith(b"data: [DONE]")
                        yield ev + b"\n\n"
                        continue
                    has_usage = b'"usage"' in ev and b'"usage":null' not in ev and b'"usage": null' not in ev
                    # Parse an event only when it can matter (each at most once): until the first
                    # content (TTFT), the usage event, and error events.
                    if not seen_content or has_usage or b'"error"' in ev:
                        try:
                            obj = json.loads(ev[5:])
                        except ValueError:
                            obj = {}
                        if "error" in obj:
                            trace.status, trace.error = 500, str(obj["error"])[:500]
                        u = _usage_of(obj) if has_usage else None
                        if u is not None:
                            trace.usage = u
                            if not client_wants_usage and not obj.get("choices"):
                                continue  # the client did not ask for it: only the audit log gets it
                        if not seen_content and _has_content(obj):
                            seen_content = True
                            trace.ttft_s = time.monotonic() - trace.t0
                    if resume is not None:
                        sent.append(ev)
                        if not resume.client_wants_ids:
                            ev = strip_ids(ev)
                    yield _public_model(ev, model_field) + b"\n\n"
                chunk = await resp.content.readany() or None
            if buf.strip():
                yield buf + b"\n\n"
            completed = True
        except UPSTREAM_ERRORS as e:
            if trace.ran_out(e):
                err = _timed_out(trace)
                trace.status, trace.error = 504, err.message
                yield f"data: {json.dumps(error_body(504, err.message, code='timeout'))}\n\n".encode()
            else:
                b.record_failure(type(e).__name__)
                if resume is not None and seen_content:
                    async for piece in self._resume(resume, sent, b, trace, client_wants_usage, e):
                        yield piece
                    done_sent = True
                    return
                trace.status, trace.error = 502, f"backend {b.name} failed mid-stream: {type(e).__name__}"
                msg = f"the backend failed after the stream started ({type(e).__name__}); the response is incomplete"
                yield f"data: {json.dumps(error_body(502, msg))}\n\n".encode()
            yield b"data: [DONE]\n\n"
        except (asyncio.CancelledError, GeneratorExit):
            if not done_sent:  # clients may hang up right after [DONE]: that stream was complete
                trace.status, trace.error = 499, "client disconnected"
            raise
        finally:
            b.outstanding -= 1
            if completed:
                resp.release()  # keep the connection for the next request
            else:
                resp.close()  # a stream cut short closes the upstream connection, so the backend aborts
            on_done(trace)

    async def _resume(self, r: Resume, events: list[bytes], failed: Backend, trace: Trace, client_wants_usage: bool,
                      why: BaseException) -> AsyncIterator[bytes]:
        """Continue a broken stream on other backends of its pool until the answer is complete
        (each continuation may break too), then [DONE]; an error event if none can."""
        sent = Sent.from_events(events, r.endpoint == "chat/completions")
        pool, names, tried = r.pool, [failed.name], {failed.name}
        outcome, error = "continued", None
        try:
            if sent.prompt_ids is None:
                raise _Unresumable(f"backend {failed.name} returned no token ids")
            for _ in range(pool.cfg.max_attempts):
                if sent.finish_reason is not None:
                    break  # the answer was complete before the connection broke
                if trace.expired():
                    raise _Unresumable("the request's time limit (server.request_timeout_s) ran out")
                candidates = [x for x in pool.available() if x.name not in tried]
                if not candidates:
                    raise _Unresumable("no other backend of the pool is available")
                b2 = self.policies[pool.name].choose(candidates, r.info)
                tried.add(b2.name)
                trace.attempts += 1
                body = continuation_body(r.body, sent, b2.model or pool.cfg.model or r.public_model)
                if body is None:  # max_tokens were all sent: the answer ends here
                    yield client_event(sent, r.public_model, "", "length", None, [], r.client_wants_ids)
                    sent.finish_reason = "length"
                    break
                names.append(b2.name)
                async for piece in self._continue_on(b2, body, sent, r, trace):
                    yield piece
            if sent.finish_reason is None:
                raise _Unresumable(f"{pool.cfg.max_attempts} attempts did not finish the answer")
        except _Unresumable as e:
            outcome, error = "failed", str(e)
        self.metrics.continuations.labels(pool.name, outcome).inc()
        trace.backend = ">".join(names)
        trace.usage = Usage(len(sent.prompt_ids or ()), len(sent.token_ids))
        if error is None:
            log.warning("pool %s: stream continued on %s after %s failed mid-stream (%s)", pool.name,
                        ", ".join(names[1:]), failed.name, type(why).__name__)
            trace.error = f"continued on {', '.join(names[1:])} after {failed.name} failed mid-stream"
            if client_wants_usage:
                yield usage_event(sent, r.public_model, trace.usage.prompt_tokens, trace.usage.completion_tokens)
        else:
            trace.status = 502
            trace.error = f"backend {failed.name} failed mid-stream ({type(why).__name__}); not continued: {error}"
            msg = (f"the backend failed after the stream started ({type(why).__name__}) and the answer could not be "
                   f"continued elsewhere ({error}); the response is incomplete")
            yield f"data: {json.dumps(error_body(502, msg))}\n\n".encode()
        yield b"data: [DONE]\n\n"

    async def _continue_on(self, b: Backend, body: dict, sent: Sent, r: Resume, trace: Trace) -> AsyncIterator[bytes]:
        """One continuation request: its events rewritten into the client's stream, `sent` kept up
        to date (so a continuation that breaks too is continued from where it stopped)."""
        b.outstanding += 1
        resp = None
        try:
            resp = await self._post(b, r.pool, "completions", body, trace)
            if resp.status != 200:
                if resp.status >= 500:
                    b.record_failure(f"HTTP {resp.status}")
                return
            buf = b""
            async for chunk in resp.content.iter_any():
                buf += chunk.replace(b"\r\n", b"\n")
                *events, buf = buf.split(b"\n\n")
                for ev in events:
                    if not ev.startswith(b"data:") or ev.startswith(b"data: [DONE]"):
                        continue
                    try:
                        obj = json.loads(ev[5:])
                    except ValueError:
                        continue
                    if "error" in obj:
                        raise _Unresumable(f"backend {b.name} answered the continuation with an error: "
                                           f"{str(obj['error'])[:200]}")
                    for ch in obj.get("choices") or ():
                        ids = ch.get("token_ids") or []
                        sent.token_ids += ids
                        sent.finish_reason = ch.get("finish_reason") or sent.finish_reason
                        yield client_event(sent, r.public_model, ch.get("text") or "", ch.get("finish_reason"),
                                           ch.get("stop_reason"), ids, r.client_wants_ids)
            b.record_success()
        except UPSTREAM_ERRORS as e:  # this one broke too: the caller continues from `sent`
            b.record_failure(type(e).__name__)
        finally:
            b.outstanding -= 1
            if resp is not None:
                resp.close()
