"""Pythonic format (Llama 3.2/4, ToolACE): the output is a Python list of calls,
`[get_weather(city="Paris"), get_time(zone="CET")]`, arguments as Python literals."""

from __future__ import annotations

import ast
import json

from pagedserve.server.tool_parsers.base import ParsedCall, ToolParser


class PythonicParser(ToolParser):
    def start(self, text: str) -> int | None:
        stripped = text.lstrip()
        return len(text) - len(stripped) if stripped.startswith("[") else None

    def partial_start(self, text: str) -> int | None:
        return 0 if not text.strip() else None

    def parse_calls(self, text: str, final: bool) -> tuple[list[ParsedCall], bool]:
        if not final:
            return [], False  # a Python list is only known to be complete at its end
        try:
            tree = ast.parse(text.strip(), mode="eval")
        except SyntaxError:
            return [], False
        if not isinstance(tree.body, ast.List):
            return [], False
        calls = []
        for node in tree.body.elts:
            if not isinstance(node, ast.Call) or node.args:
                return [], False
            name = _dotted(node.func)
            if name is None:
                return [], False
            try:
                args = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords if kw.arg}
            except ValueError:
                return [], False
            calls.append(ParsedCall(name, json.dumps(args, ensure_ascii=False)))
        return calls, True


def _dotted(node) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None
