"""llguidance (`--structured-outputs-backend guidance`): an Earley parser over a lexer; no
compile step to speak of, and the widest JSON Schema coverage (llguidance names what it lacks)."""

from __future__ import annotations

import json

import torch

from pagedserve.engine.structured_output.backend import Backend, Grammar, Matcher
from pagedserve.engine.structured_output.params import JSON_WS_REGEX, StructuredOutputsParams
from pagedserve.engine.structured_output.schema_check import unsupported_keywords


class _Matcher(Matcher):
    def __init__(self, m, fill):
        self._m = m
        self._fill = fill  # llguidance.torch.fill_next_token_bitmask, imported once per grammar

    def accept(self, token: int) -> bool:
        return self._m.consume_token(token)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        self._fill(self._m, bitmask, row)

    def is_terminated(self) -> bool:
        return self._m.is_stopped()


class _Grammar(Grammar):
    def __init__(self, tokenizer, grammar: str):
        from llguidance.torch import fill_next_token_bitmask

        self._tokenizer = tokenizer
        self._grammar = grammar
        self._fill = fill_next_token_bitmask

    def matcher(self) -> Matcher:
        import llguidance

        return _Matcher(llguidance.LLMatcher(self._tokenizer, self._grammar), self._fill)


class GuidanceBackend(Backend):
    name = "guidance"

    def __init__(self, hf_tokenizer, vocab_size: int, stop_token_ids: list[int]):
        import llguidance.hf

        # llguidance ends a grammar on the tokenizer's EOS; other stop ids stop the request in the
        # engine as usual.
        self._tokenizer = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size)

    def compile(self, p: StructuredOutputsParams) -> Grammar:
        import llguidance
        from llguidance.gbnf_to_lark import gbnf_to_lark

        M = llguidance.LLMatcher
        if p.kind in ("json", "json_object"):
            bad = unsupported_keywords(p.json, self.name) if p.kind == "json" else []
            if bad:
                raise ValueError(f"the {self.name} backend does not enforce {', '.join(bad[:5])}; remove it")
            schema = {"type": "object"} if p.kind == "json_object" else ({} if p.json is True else p.json)
            opts = {"whitespace_flexible": not p.disable_any_whitespace}
            if not p.disable_any_whitespace:
                opts["whitespace_pattern"] = JSON_WS_REGEX
            g = M.grammar_from_json_schema(schema, defaults=opts)
        elif p.kind == "regex":
            g = M.grammar_from_regex(p.regex)
        elif p.kind == "choice":
            g = M.grammar_from_lark("start: " + " | ".join(json.dumps(s, ensure_ascii=False) for s in p.choice))
        else:
            try:
                lark = gbnf_to_lark(p.grammar) if p.grammar_syntax == "ebnf" else p.grammar
            except Exception as e:
                raise ValueError(f"grammar could not be compiled ({self.name}): {e}") from None
            g = M.grammar_from_lark(lark)
        failed, messages = M.validate_grammar_with_warnings(g)
        if failed:
            raise ValueError(f"{p.kind} could not be compiled ({self.name}): {'; '.join(messages)[:500]}")
        return _Grammar(self._tokenizer, g)
