"""Continuing a stream whose backend died, on another backend, as one uninterrupted answer.

The gateway asks streaming backends for `return_token_ids` (vLLM's field, which pagedserve
serves too): the first event carries the prompt's token ids, every event the ids of the tokens
whose text it carries. When the stream breaks after the client has received text, those ids are
exactly what the client has: the continuation is a /v1/completions request for
prompt ids + generated ids, with max_tokens less what was sent, whose events are rewritten into
the client's stream (same id, same object type, chat or completion). A greedy answer continued
this way is the uninterrupted answer, token for token. Usage counts what the client received.

Only what can be continued exactly is: one choice (n = 1), no logprobs, no echo, and a backend
that returned token ids. Anything else ends with an error event, as before.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field

# Sampling fields a continuation keeps (the prompt, the stream and n are its own).
CARRIED = ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty",
           "repetition_penalty", "stop", "stop_token_ids", "ignore_eos", "logit_bias", "skip_special_tokens",
           "include_stop_str_in_output", "priority", "user")
_IDS_AFTER = re.compile(rb',\s*"(?:prompt_)?token_ids"\s*:\s*(?:null|\[[\d,\s]*\])')
_IDS_BEFORE = re.compile(rb'"(?:prompt_)?token_ids"\s*:\s*(?:null|\[[\d,\s]*\])\s*,')


def resumable(body: dict) -> bool:
    """Whether a streamed request can be continued exactly on another backend."""
    n = body.get("n")
    return (n in (None, 1) and not body.get("logprobs") and not body.get("top_logprobs") and not body.get("echo")
            and not body.get("suffix"))


def strip_ids(event: bytes) -> bytes:
    """Remove the token-id fields the gateway asked for and the client did not."""
    if b"token_ids" not in event:
        return event
    return _IDS_BEFORE.sub(b"", _IDS_AFTER.sub(b"", event))


@dataclass
class Sent:
    """What the client has received of a stream, read from its events when it breaks."""
    chat: bool
    id: str = ""
    created: int = 0
    prompt_ids: list[int] | None = None
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None

    @classmethod
    def from_events(cls, events: list[bytes], chat: bool) -> Sent:
        s = cls(chat)
        for raw in events:
            try:
                obj = json.loads(raw[5:])
            except ValueError:
                continue
            if not s.id:
                s.id, s.created = str(obj.get("id") or ""), int(obj.get("created") or time.time())
            if s.prompt_ids is None and isinstance(obj.get("prompt_token_ids"), list):
                s.prompt_ids = obj["prompt_token_ids"]
            for ch in obj.get("choices") or ():
                if s.prompt_ids is None and isinstance(ch.get("prompt_token_ids"), list):
                    s.prompt_ids = ch["prompt_token_ids"]
                s.token_ids += ch.get("token_ids") or []
                s.finish_reason = ch.get("finish_reason") or s.finish_reason
        return s


def continuation_body(client_body: dict, sent: Sent, upstream_model: str) -> dict | None:
    """The /v1/completions request that continues the answer; None when nothing is left to
    generate (max_tokens reached)."""
    body = {k: client_body[k] for k in CARRIED if k in client_body}
    max_tokens = client_body.get("max_completion_tokens") or client_body.get("max_tokens")
    if isinstance(max_tokens, int):
        left = max_tokens - len(sent.token_ids)
        if left <= 0:
            return None
        body["max_tokens"] = left
    elif sent.chat:
        body["max_tokens"] = None  # chat's default: up to the context length (completions' is 16)
    if isinstance(client_body.get("min_tokens"), int):
        body["min_tokens"] = max(0, client_body["min_tokens"] - len(sent.token_ids))
    body.update(model=upstream_model, prompt=list(sent.prompt_ids) + list(sent.token_ids), stream=True,
                stream_options={"include_usage": True}, return_token_ids=True)
    return body


def client_event(sent: Sent, public_model: str, text: str, finish_reason, stop_reason, token_ids,
                 with_ids: bool) -> bytes:
    """One continuation event, in the shape of the client's stream."""
    if sent.chat:
        choice = {"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": finish_reason}
        obj = {"id": sent.id, "object": "chat.completion.chunk", "created": sent.created, "model": public_model,
               "choices": [choice]}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason,
                  "stop_reason": stop_reason}
        obj = {"id": sent.id, "object": "text_completion", "created": sent.created, "model": public_model,
               "choices": [choice]}
    if with_ids:
        choice["token_ids"] = token_ids or []
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def usage_event(sent: Sent, public_model: str, prompt_tokens: int, completion_tokens: int) -> bytes:
    obj = {"id": sent.id, "object": "chat.completion.chunk" if sent.chat else "text_completion",
           "created": sent.created, "model": public_model, "choices": [],
           "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                     "total_tokens": prompt_tokens + completion_tokens}}
    return b"data: " + json.dumps(obj).encode() + b"\n\n"
