"""/v1/chat/completions: conversations in, messages out; tools, structured outputs, streaming.

tool_choice decides what the output is (tools.py): "none" -> content; a named function -> that
function's arguments (forced by its schema; finish_reason "stop", as OpenAI); "required" -> a
JSON list of calls (forced); "auto" -> free text read by --tool-call-parser (finish_reason
"tool_calls" when it found calls).
"""

from __future__ import annotations

import json
import time

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from pagedserve.engine.outputs import CompletionOutput
from pagedserve.model.tokenizer import apply_chat_template
from pagedserve.server import protocol as P
from pagedserve.server import structured
from pagedserve.server.context import ServingContext
from pagedserve.server.errors import APIError
from pagedserve.server.logprobs import chat_logprobs
from pagedserve.server.streaming import TextChunk, collect, merged, observe_stream, sse, stream_events
from pagedserve.server.tool_parsers import PARSERS, ParsedCall, ToolParser
from pagedserve.server.tools import conversation, parse_required, resolve_tool_choice, tool_constraint


def router(ctx: ServingContext) -> APIRouter:
    r = APIRouter(dependencies=ctx.auth)
    tokenizer = ctx.tokenizer
    model_name = ctx.model_name
    settings = ctx.settings
    parser_cls = PARSERS.get(settings.tool_call_parser or "")
    auto_enabled = settings.enable_auto_tool_choice and parser_cls is not None

    @r.post("/v1/chat/completions")
    async def chat(body: P.ChatCompletionRequest, raw: Request):
        ctx.check_model(body.model)
        if body.chat_template:
            raise APIError(400, "per-request chat_template is not accepted; start the server with --chat-template",
                           param="chat_template")
        tool_choice = resolve_tool_choice(body, auto_enabled)
        named = tool_choice.function.name if isinstance(tool_choice, P.NamedToolChoice) else None
        constraint, field = structured.from_request(body)
        forced = tool_constraint(body, tool_choice)
        if forced is not None:
            if constraint is not None:
                raise APIError(400, f"{field} and tool_choice={'named' if named else tool_choice!r} both constrain the "
                                    "output; send one", param=field)
            constraint, field = forced, "tools"
        messages, tools = conversation(body, tokenizer)
        try:
            prompt_ids = apply_chat_template(tokenizer, messages, body.add_generation_prompt, tools)
        except ValueError:
            raise
        except Exception as e:  # a template that rejects the conversation (e.g. role order)
            raise APIError(400, f"the chat template rejected the messages: {e}", param="messages")
        k = body.top_logprobs if body.logprobs else None
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "top_logprobs requires logprobs=true", param="top_logprobs")
        params = ctx.make_params(body, body.max_completion_tokens or body.max_tokens,
                                 (k or 0) if body.logprobs else None, None, constraint)
        await ctx.compile_constraint(params, field)
        rid = P.random_id("chatcmpl")
        created = int(time.time())
        streams = ctx.start(rid, [prompt_ids], params, body.priority)
        ids = body.return_token_ids
        auto = tool_choice == "auto"
        lp = (lambda c: chat_logprobs(ctx.decode_tok, c, k or 0)) if body.logprobs else (lambda c: None)

        if not body.stream:
            (o,) = await collect(ctx, raw, streams)
            choices = []
            for c in o.outputs:
                message, finish = _message(c, tool_choice, named, parser_cls() if auto else None,
                                           body.parallel_tool_calls)
                choices.append(P.ChatChoice(index=c.index, message=message, logprobs=lp(c), finish_reason=finish,
                                            stop_reason=c.stop_reason, token_ids=c.token_ids if ids else None))
            return P.ChatCompletionResponse(
                id=rid, created=created, model=model_name, choices=choices,
                usage=ctx.usage(len(o.prompt_token_ids), sum(len(c.token_ids) for c in o.outputs), o.num_cached_tokens),
                prompt_token_ids=o.prompt_token_ids if ids else None)

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        states = [_StreamState(tool_choice, named, parser_cls() if auto else None, body.parallel_tool_calls)
                  for _ in range(body.n)]

        async def gen():
            def chunk(choices, use=None, prompt_ids=None):
                return sse(P.ChatCompletionChunk(id=rid, created=created, model=model_name, choices=choices, usage=use,
                                                 prompt_token_ids=prompt_ids))

            yield chunk([P.ChatStreamChoice(index=i, delta=P.DeltaMessage(role="assistant", content=""),
                                            token_ids=[] if ids else None) for i in range(body.n)],
                        prompt_ids=list(prompt_ids) if ids else None)
            last_times: dict = {}
            completion_tokens = 0
            plain: dict[int, TextChunk] = {}  # per choice: the event of a content-only chunk

            def text_chunk(index: int, text: str) -> str:
                if index not in plain:
                    plain[index] = TextChunk(lambda t: P.ChatCompletionChunk(
                        id=rid, created=created, model=model_name,
                        choices=[P.ChatStreamChoice(index=index, delta=P.DeltaMessage(content=t))]))
                return plain[index](text)

            async for _, o in merged(streams):
                observe_stream(ctx, o, last_times, 0)
                choices = []
                for c in o.outputs:
                    completion_tokens += len(c.token_ids)
                    delta, finish = states[c.index].step(c)
                    if delta is None and not finish and not body.logprobs:
                        continue
                    if (len(o.outputs) == 1 and not finish and not body.logprobs and not ids and delta is not None
                            and delta.content and not delta.tool_calls and delta.role is None):
                        yield text_chunk(c.index, delta.content)
                        continue
                    choices.append(P.ChatStreamChoice(
                        index=c.index, delta=delta or P.DeltaMessage(content=""), logprobs=lp(c),
                        finish_reason=finish, token_ids=c.text_token_ids if ids else None))
                if choices:
                    yield chunk(choices)
            if include_usage:
                yield chunk([], ctx.usage(len(prompt_ids), completion_tokens))

        return StreamingResponse(stream_events(ctx, gen()), media_type="text/event-stream")

    return r


def _tool_call(call: ParsedCall) -> P.ToolCall:
    return P.ToolCall(function=P.FunctionCall(name=call.name, arguments=call.arguments))


def _message(c: CompletionOutput, tool_choice, named: str | None, parser: ToolParser | None,
             parallel: bool) -> tuple[P.ChatResponseMessage, str | None]:
    """A finished choice as (message, finish_reason)."""
    text, finish = c.text, c.finish_reason
    calls: list[ParsedCall] = []
    content: str | None = text
    if named is not None and _is_json(text):
        calls, content = [ParsedCall(named, text)], None
    elif tool_choice == "required":
        found = parse_required(text)
        if found is not None:
            calls, content = [ParsedCall(n, a) for n, a in found], None
    elif parser is not None:
        content, calls = parser.parse(text)
        if not parallel:
            calls = calls[:1]
    if calls and named is None and finish == "stop":
        finish = "tool_calls"
    return P.ChatResponseMessage(content=content, tool_calls=[_tool_call(x) for x in calls]), finish


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


class _StreamState:
    """One streamed choice: turns text deltas into content or tool-call deltas."""

    def __init__(self, tool_choice, named: str | None, parser: ToolParser | None, parallel: bool):
        self.tool_choice = tool_choice
        self.named = named
        self.parser = parser
        self.parallel = parallel
        self.held = ""  # "required": the JSON list, parsed at the end
        self.named_id: str | None = None
        self.num_calls = 0

    def _calls(self, calls: list[ParsedCall]) -> list[P.DeltaToolCall]:
        out = []
        for call in calls:
            if not self.parallel and self.num_calls >= 1:
                break
            out.append(P.DeltaToolCall(index=self.num_calls, id=P.random_id("call"), type="function",
                                       function=P.DeltaFunctionCall(name=call.name, arguments=call.arguments)))
            self.num_calls += 1
        return out

    def step(self, c: CompletionOutput) -> tuple[P.DeltaMessage | None, str | None]:
        text, finish = c.text, c.finish_reason
        if self.named is not None:  # arguments stream as they are generated
            if not text:
                return None, finish
            if self.named_id is None:
                self.named_id = P.random_id("call")
                call = P.DeltaToolCall(index=0, id=self.named_id, type="function",
                                       function=P.DeltaFunctionCall(name=self.named, arguments=text))
            else:
                call = P.DeltaToolCall(index=0, function=P.DeltaFunctionCall(arguments=text))
            return P.DeltaMessage(tool_calls=[call]), finish
        if self.tool_choice == "required":
            self.held += text
            if not finish:
                return None, None
            found = parse_required(self.held)
            if found is None:
                return P.DeltaMessage(content=self.held), finish
            calls = self._calls([ParsedCall(n, a) for n, a in found])
            return P.DeltaMessage(tool_calls=calls), "tool_calls" if finish == "stop" else finish
        if self.parser is None:
            return (P.DeltaMessage(content=text) if text else None), finish
        content, calls = self.parser.feed(text)
        if finish:
            more_content, more_calls = self.parser.finish()
            content, calls = content + more_content, calls + more_calls
        deltas = self._calls(calls)
        if finish == "stop" and self.num_calls:
            finish = "tool_calls"
        if not content and not deltas:
            return None, finish
        return P.DeltaMessage(content=content or None, tool_calls=deltas or None), finish
