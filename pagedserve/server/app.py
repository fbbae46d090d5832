"""The OpenAI-compatible HTTP server: routes, limits, auth, errors, streaming."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pagedserve import __version__
from pagedserve.engine.async_engine import AsyncEngine, EngineDeadError, ShuttingDownError
from pagedserve.engine.outputs import CompletionOutput, RequestOutput
from pagedserve.engine.sampling_params import OutputKind, SamplingParams
from pagedserve.model.tokenizer import apply_chat_template
from pagedserve.server import protocol as P
from pagedserve.server.errors import APIError, error_body, error_response, install_error_handlers, quote
from pagedserve.server.metrics import ServerMetrics
from pagedserve.server.middleware import BodyLimitMiddleware, bearer_token

log = logging.getLogger("pagedserve.server")


@dataclass
class ServerSettings:
    served_model_names: list[str]
    api_key: str | None = None
    max_waiting_requests: int = 1024
    max_request_body_bytes: int = 4 << 20
    request_timeout: float = 600.0  # seconds for one request, start to end
    root_model: str | None = None
    extra: dict = field(default_factory=dict)


def build_app(engine: AsyncEngine, settings: ServerSettings) -> FastAPI:
    core = engine.engine
    tokenizer = core.tokenizer
    model_name = settings.served_model_names[0]
    metrics = ServerMetrics(core, model_name)

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        log.info("shutting down: engine loop stops")
        engine.shutdown()

    app = FastAPI(title="pagedserve", version=__version__, lifespan=lifespan)
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_request_body_bytes)
    app.state.engine = engine
    app.state.metrics = metrics

    # -- errors ----------------------------------------------------------------------------
    install_error_handlers(app, log)

    @app.exception_handler(RequestValidationError)
    async def _validation(_, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        msg = "; ".join(
            f"{'.'.join(str(x) for x in err.get('loc', ()) if x != 'body') or 'body'}: {err.get('msg')}" for err in errs[:5]
        )
        return error_response(400, msg or "invalid request body", ".".join(loc) or None, "invalid_request")

    @app.exception_handler(ValueError)
    async def _value(_, e: ValueError):
        return error_response(400, str(e), code="invalid_request")

    @app.exception_handler(EngineDeadError)
    async def _dead(_, e: EngineDeadError):
        return error_response(503, str(e) if isinstance(e, ShuttingDownError) else f"the engine is not running: {e}")

    # -- dependencies ----------------------------------------------------------------------
    async def check_key(request: Request):
        if settings.api_key is None:
            return
        token = bearer_token(request.headers.get("authorization")) or ""
        if not hmac.compare_digest(token.encode(), settings.api_key.encode()):
            raise APIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")

    def check_model(name: str | None) -> None:
        if name is not None and name not in settings.served_model_names:
            raise APIError(404, f"The model {quote(name)} does not exist. Served: {settings.served_model_names}",
                           param="model", code="model_not_found")

    def check_capacity() -> None:
        if engine.num_waiting >= settings.max_waiting_requests:
            raise APIError(503, f"server overloaded: {engine.num_waiting} requests waiting "
                                f"(--max-waiting-requests={settings.max_waiting_requests}); retry shortly",
                           code="overloaded", headers={"Retry-After": "1"})

    auth = [Depends(check_key)]

    # -- plain routes ----------------------------------------------------------------------
    @app.get("/health")
    async def health():
        ok, why = engine.health()
        return Response(status_code=200) if ok else error_response(503, why)

    @app.get("/ping")
    async def ping():
        return await health()

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.get("/metrics")
    async def prom():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=auth)
    async def models():
        cards = [P.ModelCard(id=n, root=settings.root_model, max_model_len=core.max_model_len)
                 for n in settings.served_model_names]
        return P.ModelList(data=cards)

    @app.post("/tokenize", dependencies=auth)
    async def tokenize(body: P.TokenizeRequest):
        check_model(body.model)
        if body.messages is not None:
            ids = apply_chat_template(tokenizer, [m.model_dump(include={"role"}) | {"content": m.text()} for m in body.messages],
                                      body.add_generation_prompt)
        elif body.prompt is not None:
            ids = core.tokenize(body.prompt, body.add_special_tokens)
        else:
            raise APIError(400, "give either prompt or messages", param="prompt")
        return {"tokens": ids, "count": len(ids), "max_model_len": core.max_model_len}

    @app.post("/detokenize", dependencies=auth)
    async def detokenize(body: P.DetokenizeRequest):
        check_model(body.model)
        bad = [t for t in body.tokens if not 0 <= t < core.arch.vocab_size]
        if bad:
            raise APIError(400, f"token ids outside [0, {core.arch.vocab_size}): {bad[:5]}", param="tokens")
        return {"prompt": tokenizer.decode(body.tokens)}

    # -- generation helpers ----------------------------------------------------------------
    def make_params(body: P._SamplingFields, max_tokens: int | None, logprobs: int | None,
                    prompt_logprobs: int | None) -> SamplingParams:
        bias = None
        if body.logit_bias:
            try:
                bias = {int(k): float(v) for k, v in body.logit_bias.items()}
            except ValueError:
                raise APIError(400, "logit_bias keys must be token ids (integers as strings)", param="logit_bias")
        try:
            return SamplingParams(
                n=body.n, temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k or 0,
                min_p=body.min_p or 0.0, seed=None if body.seed is None else body.seed % (2**63),
                presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                repetition_penalty=body.repetition_penalty or 1.0, stop=body.stop,
                stop_token_ids=body.stop_token_ids, ignore_eos=body.ignore_eos, max_tokens=max_tokens,
                min_tokens=body.min_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                logit_bias=bias, skip_special_tokens=body.skip_special_tokens,
                include_stop_str_in_output=body.include_stop_str_in_output,
                output_kind=OutputKind.DELTA if body.stream else OutputKind.FINAL_ONLY,
            )
        except ValueError as e:
            raise APIError(400, str(e), code="invalid_request")

    def start(rid: str, prompts: list[str | list[int]], params: SamplingParams, priority: int) -> list[AsyncIterator]:
        check_capacity()
        streams, ids = [], []
        try:
            for i, prompt in enumerate(prompts):
                ids.append(f"{rid}-{i}")
                streams.append(engine.generate(ids[-1], prompt, params, priority))
        except ValueError as e:
            for r in ids[: len(streams)]:
                engine.abort(r)
            raise APIError(400, str(e), param="prompt" if "prompt" in str(e) else None, code="invalid_request")
        return streams

    async def collect(raw: Request, streams: list[AsyncIterator]) -> list[RequestOutput]:
        """Wait for every final output; abort all if the client leaves or the timeout passes."""

        async def last(it):
            out = None
            async for out in it:
                pass
            return out

        tasks = [asyncio.ensure_future(last(s)) for s in streams]
        deadline = time.monotonic() + settings.request_timeout
        try:
            while True:
                done, pending = await asyncio.wait(tasks, timeout=0.5, return_when=asyncio.ALL_COMPLETED)
                if not pending:
                    break
                if await raw.is_disconnected():
                    raise APIError(499, "client disconnected")
                if time.monotonic() > deadline:
                    raise APIError(504, f"request timed out after {settings.request_timeout:.0f}s (--request-timeout)")
            outs = [t.result() for t in tasks]
        finally:
            for t in tasks:
                t.cancel()  # closes the generators, which aborts unfinished requests
        for o in outs:
            metrics.observe_finished(o.metrics)
            for c in o.outputs:
                n = len(c.token_ids)
                if n > 1 and o.metrics.first_token_time and o.metrics.last_token_time:
                    gap = (o.metrics.last_token_time - o.metrics.first_token_time) / (n - 1)
                    for _ in range(n - 1):
                        metrics.itl.observe(gap)
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

    async def stream_events(gen: AsyncIterator[str]) -> AsyncIterator[str]:
        """Wrap an SSE generator: enforce the timeout and turn failures into an error event."""
        deadline = time.monotonic() + settings.request_timeout
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

    def observe_stream(o: RequestOutput, last_times: dict, key) -> None:
        now = time.monotonic()
        for c in o.outputs:
            k = (key, c.index)
            if k in last_times and c.token_ids:
                gap = (now - last_times[k]) / len(c.token_ids)
                for _ in c.token_ids:
                    metrics.itl.observe(gap)
            last_times[k] = now
        if o.finished:
            metrics.observe_finished(o.metrics)

    def usage(prompt_tokens: int, completion_tokens: int, cached: int = 0) -> P.Usage:
        return P.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                       total_tokens=prompt_tokens + completion_tokens,
                       prompt_tokens_details={"cached_tokens": cached} if cached else None)

    def decode_tok(t: int) -> str:
        return tokenizer.decode([t])

    def completion_logprobs(c: CompletionOutput, prompt_part: list | None, prompt_ids: list[int] | None,
                            offset: int) -> P.CompletionLogprobs:
        lp = P.CompletionLogprobs()
        entries = list(zip(prompt_ids or [], prompt_part or [])) + list(zip(c.token_ids, c.logprobs or []))
        for tok, pos in entries:
            s = decode_tok(tok)
            lp.tokens.append(s)
            lp.text_offset.append(offset)
            offset += len(s)
            if pos is None:
                lp.token_logprobs.append(None)
                lp.top_logprobs.append(None)
                continue
            lp.token_logprobs.append(pos[tok].logprob)
            lp.top_logprobs.append({v.decoded_token: v.logprob for v in pos.values()})
        return lp

    def chat_logprobs(c: CompletionOutput, k: int) -> P.ChatLogprobs:
        content = []
        for tok, pos in zip(c.token_ids, c.logprobs or []):
            s = decode_tok(tok)
            tops = sorted(pos.values(), key=lambda v: v.rank)[:k]
            content.append(P.ChatTokenLogprob(
                token=s, logprob=pos[tok].logprob, bytes=list(s.encode()),
                top_logprobs=[P.TopLogprob(token=v.decoded_token, logprob=v.logprob,
                                           bytes=list((v.decoded_token or "").encode())) for v in tops]))
        return P.ChatLogprobs(content=content)

    # -- /v1/completions -------------------------------------------------------------------
    @app.post("/v1/completions", dependencies=auth)
    async def completions(body: P.CompletionRequest, raw: Request):
        check_model(body.model)
        if body.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        prompts = _normalize_prompt(body.prompt)
        want_lp = body.logprobs
        params = make_params(body, body.max_tokens, want_lp,
                             want_lp if (body.echo and want_lp is not None) else None)
        rid = P.random_id("cmpl")
        created = int(time.time())
        streams = start(rid, prompts, params, body.priority)
        n = body.n
        prompt_texts = [p if isinstance(p, str) else tokenizer.decode(p) for p in prompts]

        if not body.stream:
            outs = await collect(raw, streams)
            choices = []
            for i, o in enumerate(outs):
                for c in o.outputs:
                    text = (prompt_texts[i] if body.echo else "") + c.text
                    lp = None
                    if want_lp is not None:
                        lp = completion_logprobs(c, o.prompt_logprobs if body.echo else None,
                                                 o.prompt_token_ids if body.echo else None, 0)
                    ids = body.return_token_ids
                    choices.append(P.CompletionChoice(index=i * n + c.index, text=text, logprobs=lp,
                                                      finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                                                      prompt_token_ids=o.prompt_token_ids if ids else None,
                                                      token_ids=c.token_ids if ids else None))
            return P.CompletionResponse(
                id=rid, created=created, model=model_name, choices=choices,
                usage=usage(sum(len(o.prompt_token_ids) for o in outs),
                            sum(len(c.token_ids) for o in outs for c in o.outputs),
                            sum(o.num_cached_tokens for o in outs)))

        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def gen():
            last_times: dict = {}
            prompt_tokens = completion_tokens = 0
            echoed: set = set()
            started: set = set()  # choice indexes that had their first chunk (prompt_token_ids go there)
            offsets: dict = {}
            async for i, o in merged(streams):
                observe_stream(o, last_times, i)
                choices = []
                for c in o.outputs:
                    idx = i * n + c.index
                    text = c.text
                    if body.echo and idx not in echoed:
                        echoed.add(idx)
                        text = prompt_texts[i] + text
                    lp = None
                    if want_lp is not None:
                        lp = completion_logprobs(c, None, None, offsets.get(idx, 0))
                        offsets[idx] = offsets.get(idx, 0) + sum(len(t) for t in lp.tokens)
                    completion_tokens += len(c.token_ids)
                    first_of_choice = idx not in started
                    started.add(idx)
                    ids = body.return_token_ids
                    choices.append(P.CompletionChoice(
                        index=idx, text=text, logprobs=lp, finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                        prompt_token_ids=o.prompt_token_ids if ids and first_of_choice else None,
                        token_ids=c.text_token_ids if ids else None))
                if o.finished:
                    prompt_tokens += len(o.prompt_token_ids)
                if choices:
                    yield sse(P.CompletionResponse(id=rid, created=created, model=model_name, choices=choices))
            if include_usage:
                yield sse(P.CompletionResponse(id=rid, created=created, model=model_name, choices=[],
                                               usage=usage(prompt_tokens, completion_tokens)))

        return StreamingResponse(stream_events(gen()), media_type="text/event-stream")

    # -- /v1/chat/completions --------------------------------------------------------------
    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat(body: P.ChatCompletionRequest, raw: Request):
        check_model(body.model)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        if body.chat_template:
            raise APIError(400, "per-request chat_template is not accepted; start the server with --chat-template",
                           param="chat_template")
        try:
            prompt_ids = apply_chat_template(tokenizer, messages, body.add_generation_prompt)
        except ValueError:
            raise
        except Exception as e:  # a template that rejects the conversation (e.g. role order)
            raise APIError(400, f"the chat template rejected the messages: {e}", param="messages")
        k = body.top_logprobs if body.logprobs else None
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "top_logprobs requires logprobs=true", param="top_logprobs")
        params = make_params(body, body.max_completion_tokens or body.max_tokens,
                             (k or 0) if body.logprobs else None, None)
        rid = P.random_id("chatcmpl")
        created = int(time.time())
        streams = start(rid, [prompt_ids], params, body.priority)

        if not body.stream:
            (o,) = await collect(raw, streams)
            ids = body.return_token_ids
            choices = [P.ChatChoice(index=c.index, message=P.ChatResponseMessage(content=c.text),
                                    logprobs=chat_logprobs(c, k or 0) if body.logprobs else None,
                                    finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                                    token_ids=c.token_ids if ids else None) for c in o.outputs]
            return P.ChatCompletionResponse(
                id=rid, created=created, model=model_name, choices=choices,
                usage=usage(len(o.prompt_token_ids), sum(len(c.token_ids) for c in o.outputs), o.num_cached_tokens),
                prompt_token_ids=o.prompt_token_ids if ids else None)

        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def gen():
            def chunk(choices, use=None, prompt_ids=None):
                return sse(P.ChatCompletionChunk(id=rid, created=created, model=model_name, choices=choices, usage=use,
                                                 prompt_token_ids=prompt_ids))

            ids = body.return_token_ids
            yield chunk([P.ChatStreamChoice(index=i, delta=P.DeltaMessage(role="assistant", content=""),
                                            token_ids=[] if ids else None) for i in range(body.n)],
                        prompt_ids=list(prompt_ids) if ids else None)
            last_times: dict = {}
            completion_tokens = 0
            async for _, o in merged(streams):
                observe_stream(o, last_times, 0)
                choices = []
                for c in o.outputs:
                    completion_tokens += len(c.token_ids)
                    if not c.text and not c.finish_reason and not body.logprobs:
                        continue
                    choices.append(P.ChatStreamChoice(
                        index=c.index, delta=P.DeltaMessage(content=c.text),
                        logprobs=chat_logprobs(c, k or 0) if body.logprobs else None,
                        finish_reason=c.finish_reason, token_ids=c.text_token_ids if ids else None))
                if choices:
                    yield chunk(choices)
            if include_usage:
                yield chunk([], usage(len(prompt_ids), completion_tokens))

        return StreamingResponse(stream_events(gen()), media_type="text/event-stream")

    return app


def _normalize_prompt(prompt) -> list[str | list[int]]:
    """OpenAI's four prompt forms -> a list of prompts (text or token ids)."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    if all(isinstance(p, str) for p in prompt):
        return list(prompt)
    if all(isinstance(p, list) for p in prompt):
        return [list(p) for p in prompt]
    raise APIError(400, "prompt must be a string, a list of strings, a list of token ids, or a list of such lists",
                   param="prompt")
