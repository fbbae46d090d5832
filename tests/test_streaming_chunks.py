"""The streamed text chunk's shortcut (server/streaming.py TextChunk) writes the bytes pydantic writes."""

from __future__ import annotations

import json

import pytest

from pagedserve.server import protocol as P
from pagedserve.server.streaming import _SENTINEL, TextChunk, sse

AWKWARD = ["hi", ' "quoted" \\ back / slash', "a\nb\tc\r\x0c\x08", "".join(chr(i) for i in range(32)),
           "\x7f\x80\u2028\u2029", "é漢字😀", "\ufffd", "</script>", "", " " * 3, _SENTINEL, "}]},{\"index\":1"]


def _completion(model: str):
    return lambda t: P.CompletionResponse(id="cmpl-1", created=7, model=model,
                                          choices=[P.CompletionChoice(index=3, text=t)])


def _chat(model: str):
    return lambda t: P.ChatCompletionChunk(id="chatcmpl-1", created=7, model=model,
                                           choices=[P.ChatStreamChoice(index=0, delta=P.DeltaMessage(content=t))])


@pytest.mark.parametrize("make", [_completion, _chat])
@pytest.mark.parametrize("model", ["m", 'a "quoted" model\n', "模型"])
def test_text_chunk_is_byte_for_byte_what_pydantic_writes(make, model):
    mk = make(model)
    chunk = TextChunk(mk)
    assert chunk.parts is not None  # the shortcut is taken
    for text in AWKWARD:
        out = chunk(text)
        assert out == sse(mk(text)), text
        body = json.loads(out.removeprefix("data: "))
        choice = body["choices"][0]
        assert (choice.get("text") if "text" in choice else choice["delta"]["content"]) == text


def test_a_sentinel_in_the_fixed_fields_falls_back_to_pydantic():
    mk = _chat(_SENTINEL)  # the model name holds the sentinel too: two matches, no shortcut
    chunk = TextChunk(mk)
    assert chunk.parts is None
    assert chunk("hello") == sse(mk("hello"))
