"""Logprobs in the two OpenAI shapes: completions' parallel lists and chat's per-token objects."""

from __future__ import annotations

from collections.abc import Callable

from pagedserve.engine.outputs import CompletionOutput
from pagedserve.server import protocol as P


def completion_logprobs(decode: Callable[[int], str], c: CompletionOutput, prompt_part: list | None,
                        prompt_ids: list[int] | None, offset: int) -> P.CompletionLogprobs:
    lp = P.CompletionLogprobs()
    entries = list(zip(prompt_ids or [], prompt_part or [])) + list(zip(c.token_ids, c.logprobs or []))
    for tok, pos in entries:
        s = decode(tok)
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


def chat_logprobs(decode: Callable[[int], str], c: CompletionOutput, k: int) -> P.ChatLogprobs:
    content = []
    for tok, pos in zip(c.token_ids, c.logprobs or []):
        s = decode(tok)
        tops = sorted(pos.values(), key=lambda v: v.rank)[:k]
        content.append(P.ChatTokenLogprob(
            token=s, logprob=pos[tok].logprob, bytes=list(s.encode()),
            top_logprobs=[P.TopLogprob(token=v.decoded_token, logprob=v.logprob,
                                       bytes=list((v.decoded_token or "").encode())) for v in tops]))
    return P.ChatLogprobs(content=content)
