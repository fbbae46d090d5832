"""Llama 3.x JSON format: the output is `{"name": ..., "parameters": {...}}` (optionally after
`<|python_tag|>`), several calls separated by `;`."""

from __future__ import annotations

import json

from pagedserve.server.tool_parsers.base import ParsedCall, ToolParser, arguments_json

TAG = "<|python_tag|>"


class Llama3JsonParser(ToolParser):
    def start(self, text: str) -> int | None:
        stripped = text.lstrip()
        if stripped.startswith(TAG) or stripped.startswith("{"):
            return len(text) - len(stripped)
        return None

    def partial_start(self, text: str) -> int | None:
        stripped = text.lstrip()
        return 0 if TAG.startswith(stripped) else None  # empty or a cut tag: wait

    def parse_calls(self, text: str, final: bool) -> tuple[list[ParsedCall], bool]:
        text = text.strip().removeprefix(TAG).strip()
        dec = json.JSONDecoder()
        calls, i = [], 0
        while i < len(text):
            try:
                obj, j = dec.raw_decode(text, i)
            except ValueError:
                return calls, False
            if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
                return calls, False
            calls.append(ParsedCall(obj["name"], arguments_json(obj.get("parameters", obj.get("arguments", {})))))
            i = j
            while i < len(text) and text[i] in " \t\r\n;":
                i += 1
        return calls, True
