"""/v1/models, /tokenize and /detokenize."""

from __future__ import annotations

from fastapi import APIRouter

from pagedserve.model.tokenizer import apply_chat_template
from pagedserve.server import protocol as P
from pagedserve.server.context import ServingContext
from pagedserve.server.errors import APIError
from pagedserve.server.tools import conversation


def router(ctx: ServingContext) -> APIRouter:
    r = APIRouter(dependencies=ctx.auth)
    core = ctx.core

    @r.get("/v1/models")
    async def models():
        cards = [P.ModelCard(id=n, root=ctx.settings.root_model, max_model_len=core.max_model_len)
                 for n in ctx.settings.served_model_names]
        return P.ModelList(data=cards)

    @r.post("/tokenize")
    async def tokenize(body: P.TokenizeRequest):
        ctx.check_model(body.model)
        if body.messages is not None:
            messages, tools = conversation(P.ChatCompletionRequest(messages=body.messages, tools=body.tools), ctx.tokenizer)
            ids = apply_chat_template(ctx.tokenizer, messages, body.add_generation_prompt, tools)
        elif body.prompt is not None:
            ids = core.tokenize(body.prompt, body.add_special_tokens)
        else:
            raise APIError(400, "give either prompt or messages", param="prompt")
        return {"tokens": ids, "count": len(ids), "max_model_len": core.max_model_len}

    @r.post("/detokenize")
    async def detokenize(body: P.DetokenizeRequest):
        ctx.check_model(body.model)
        V = core.arch.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < V]
        if bad:
            raise APIError(400, f"token ids outside [0, {V}): {bad[:5]}", param="tokens")
        return {"prompt": ctx.tokenizer.decode(body.tokens)}

    return r
