"""/v1/completions: text in, text out, whole or streamed."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from pagedserve.server import protocol as P
from pagedserve.server import structured
from pagedserve.server.context import ServingContext
from pagedserve.server.errors import APIError
from pagedserve.server.logprobs import completion_logprobs
from pagedserve.server.streaming import TextChunk, collect, merged, observe_stream, sse, stream_events


def router(ctx: ServingContext) -> APIRouter:
    r = APIRouter(dependencies=ctx.auth)
    tokenizer = ctx.tokenizer
    model_name = ctx.model_name

    @r.post("/v1/completions")
    async def completions(body: P.CompletionRequest, raw: Request):
        ctx.check_model(body.model)
        if body.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        prompts = normalize_prompt(body.prompt)
        want_lp = body.logprobs
        constraint, field = structured.from_request(body)
        params = ctx.make_params(body, body.max_tokens, want_lp,
                                 want_lp if (body.echo and want_lp is not None) else None, constraint)
        await ctx.compile_constraint(params, field)
        rid = P.random_id("cmpl")
        created = int(time.time())
        streams = ctx.start(rid, prompts, params, body.priority)
        n = body.n
        prompt_texts = [p if isinstance(p, str) else tokenizer.decode(p) for p in prompts]
        ids = body.return_token_ids

        if not body.stream:
            outs = await collect(ctx, raw, streams)
            choices = []
            for i, o in enumerate(outs):
                for c in o.outputs:
                    text = (prompt_texts[i] if body.echo else "") + c.text
                    lp = None
                    if want_lp is not None:
                        lp = completion_logprobs(ctx.decode_tok, c, o.prompt_logprobs if body.echo else None,
                                                 o.prompt_token_ids if body.echo else None, 0)
                    choices.append(P.CompletionChoice(index=i * n + c.index, text=text, logprobs=lp,
                                                      finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                                                      prompt_token_ids=o.prompt_token_ids if ids else None,
                                                      token_ids=c.token_ids if ids else None))
            return P.CompletionResponse(
                id=rid, created=created, model=model_name, choices=choices,
                usage=ctx.usage(sum(len(o.prompt_token_ids) for o in outs),
                                sum(len(c.token_ids) for o in outs for c in o.outputs),
                                sum(o.num_cached_tokens for o in outs)))

        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def gen():
            last_times: dict = {}
            prompt_tokens = completion_tokens = 0
            echoed: set = set()
            started: set = set()  # choice indexes that had their first chunk (prompt_token_ids go there)
            offsets: dict = {}
            plain: dict[int, TextChunk] = {}  # per choice: the event of a text-only chunk

            def text_chunk(idx: int, text: str) -> str:
                if idx not in plain:
                    plain[idx] = TextChunk(lambda t: P.CompletionResponse(
                        id=rid, created=created, model=model_name, choices=[P.CompletionChoice(index=idx, text=t)]))
                return plain[idx](text)

            async for i, o in merged(streams):
                observe_stream(ctx, o, last_times, i)
                choices = []
                for c in o.outputs:
                    idx = i * n + c.index
                    text = c.text
                    if body.echo and idx not in echoed:
                        echoed.add(idx)
                        text = prompt_texts[i] + text
                    if (len(o.outputs) == 1 and want_lp is None and not ids and c.finish_reason is None
                            and c.stop_reason is None and idx in started):
                        completion_tokens += len(c.token_ids)
                        yield text_chunk(idx, text)
                        continue
                    lp = None
                    if want_lp is not None:
                        lp = completion_logprobs(ctx.decode_tok, c, None, None, offsets.get(idx, 0))
                        offsets[idx] = offsets.get(idx, 0) + sum(len(t) for t in lp.tokens)
                    completion_tokens += len(c.token_ids)
                    first_of_choice = idx not in started
                    started.add(idx)
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
                                               usage=ctx.usage(prompt_tokens, completion_tokens)))

        return StreamingResponse(stream_events(ctx, gen()), media_type="text/event-stream")

    return r


def normalize_prompt(prompt) -> list[str | list[int]]:
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
