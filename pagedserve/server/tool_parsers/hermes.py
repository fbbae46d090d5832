"""Hermes / Qwen format: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block
per call, possibly after some text. (Also what pagedserve's tool prompt asks of models whose
chat template has no tool support.)"""

from __future__ import annotations

import json
import re

from pagedserve.server.tool_parsers.base import ParsedCall, ToolParser, arguments_json

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), re.DOTALL)


class HermesParser(ToolParser):
    def start(self, text: str) -> int | None:
        i = text.find(OPEN)
        return None if i < 0 else i

    def partial_start(self, text: str) -> int | None:
        for k in range(min(len(OPEN) - 1, len(text)), 0, -1):
            if text.endswith(OPEN[:k]):
                return len(text) - k
        return None

    def parse_calls(self, text: str, final: bool) -> tuple[list[ParsedCall], bool]:
        calls = []
        ok = True
        end = 0
        for m in _BLOCK.finditer(text):
            call = _call(m.group(1))
            if call is None:
                ok = False
                break
            calls.append(call)
            end = m.end()
        rest = text[end:].strip()
        if final and rest:
            # The last block may lack its closing tag (the output ended at EOS right after the JSON).
            call = _call(rest.removeprefix(OPEN)) if rest.startswith(OPEN) else None
            if call is None:
                ok = False
            else:
                calls.append(call)
        return calls, ok


def _call(body: str) -> ParsedCall | None:
    try:
        obj = json.loads(body.strip())
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    return ParsedCall(obj["name"], arguments_json(obj.get("arguments", obj.get("parameters", {}))))
