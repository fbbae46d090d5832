"""What a request asks its output to match: vLLM's `StructuredOutputsParams`, checked at creation.

Exactly one constraint per request: a JSON schema, any JSON object, a regex, a choice among
strings, or a grammar (EBNF/GBNF when it has `::=` rules, Lark otherwise).
"""

from __future__ import annotations

import json as _json
from dataclasses import dataclass

KINDS = ("json", "json_object", "regex", "choice", "grammar")
# Limits on what one request may ask the compiler to do (bounded work on a shared thread).
MAX_SPEC_CHARS = 256 * 1024
MAX_CHOICES = 1024
# Whitespace between JSON tokens: nothing, one space, or one newline and up to 19 spaces/tabs of
# indent (llama.cpp's JSON grammars allow the same). Compact and pretty-printed JSON both fit; what
# does not is the filler a small model otherwise emits until max_tokens ("\n\n\n\n..." in every
# gap: measured on SmolLM2-135M and tiny models with unbounded whitespace).
# disable_any_whitespace instead fixes the separators (", " and ": ", no newlines).
JSON_MAX_INDENT = 19
JSON_WS_REGEX = f"(?: |\n[ \t]{{0,{JSON_MAX_INDENT}}})?"
JSON_WS_EBNF = f'json_ws ::= "" | " " | ("\\n" [ \\t]{{0,{JSON_MAX_INDENT}}})'


@dataclass
class StructuredOutputsParams:
    json: dict | str | bool | None = None  # a JSON schema (dict or its JSON text)
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False  # JSON without free whitespace between tokens (compact)

    def __post_init__(self) -> None:
        given = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(
                f"structured outputs take exactly one of {list(KINDS)}, got {given or 'none'}"
            )
        if isinstance(self.json, str):
            try:
                self.json = _json.loads(self.json)
            except ValueError as e:
                raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from None
        if self.json is not None and not isinstance(self.json, (dict, bool)):
            raise ValueError("structured_outputs.json must be a JSON schema (an object)")
        if self.choice is not None:
            if not isinstance(self.choice, list) or not self.choice or len(self.choice) > MAX_CHOICES:
                raise ValueError(f"structured_outputs.choice must be a list of 1 to {MAX_CHOICES} strings")
            if not all(isinstance(c, str) and c for c in self.choice):
                raise ValueError("structured_outputs.choice must hold non-empty strings")
        for name in ("regex", "grammar"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v.strip()):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string")
        if len(self.spec) > MAX_SPEC_CHARS:
            raise ValueError(f"structured_outputs.{self.kind} is {len(self.spec)} characters; the limit is {MAX_SPEC_CHARS}")

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    @property
    def spec(self) -> str:
        """The constraint as canonical text: the compile cache's key (with kind and whitespace)."""
        k = self.kind
        if k == "json":
            return _json.dumps(self.json, sort_keys=True, separators=(",", ":"))
        if k == "choice":
            return _json.dumps(self.choice)
        if k == "json_object":
            return ""
        return getattr(self, k)

    @property
    def key(self) -> tuple[str, str, bool]:
        return self.kind, self.spec, self.disable_any_whitespace

    @property
    def grammar_syntax(self) -> str:
        """'ebnf' (GBNF/xgrammar's EBNF: `root ::= ...`) or 'lark' (`start: ...`)."""
        return "ebnf" if self.grammar is not None and "::=" in self.grammar else "lark"
