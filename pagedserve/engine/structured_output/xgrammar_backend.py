"""xgrammar (vLLM's default): grammars compile to a pushdown automaton with a per-token cache,
so filling one row's mask costs microseconds."""

from __future__ import annotations

import json
import re

import torch

from pagedserve.engine.structured_output.backend import Backend, Grammar, Matcher
from pagedserve.engine.structured_output.params import JSON_WS_EBNF, StructuredOutputsParams
from pagedserve.engine.structured_output.schema_check import unsupported_keywords


class _Matcher(Matcher):
    def __init__(self, m):
        self._m = m

    def accept(self, token: int) -> bool:
        return self._m.accept_token(token)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        self._m.fill_next_token_bitmask(bitmask, row)

    def is_terminated(self) -> bool:
        return self._m.is_terminated()


class _Grammar(Grammar):
    def __init__(self, compiled):
        self._compiled = compiled

    def matcher(self) -> Matcher:
        import xgrammar as xgr

        return _Matcher(xgr.GrammarMatcher(self._compiled))


class XGrammarBackend(Backend):
    name = "xgrammar"

    def __init__(self, hf_tokenizer, vocab_size: int, stop_token_ids: list[int]):
        import xgrammar as xgr

        info = xgr.TokenizerInfo.from_huggingface(hf_tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
        # One compile thread: the compile pool already runs off the step loop, and the step's
        # torch threads need the cores.
        self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)

    def compile(self, p: StructuredOutputsParams) -> Grammar:
        c = self._compiler
        ws = not p.disable_any_whitespace
        try:
            if p.kind == "json":
                bad = unsupported_keywords(p.json, self.name)
                if bad:
                    raise ValueError(f"the {self.name} backend does not enforce {', '.join(bad[:5])}; remove "
                                     "it or start the server with --structured-outputs-backend guidance or auto")
                schema = {} if p.json is True else p.json
                g = self._json(schema, ws)
            elif p.kind == "json_object":
                g = self._json({"type": "object"}, ws)
            elif p.kind == "regex":
                g = c.compile_regex(p.regex)
            elif p.kind == "choice":
                g = c.compile_grammar("root ::= " + " | ".join(json.dumps(s, ensure_ascii=False) for s in p.choice))
            elif p.grammar_syntax == "ebnf":
                g = c.compile_grammar(p.grammar)
            else:
                g = c.compile_lark(p.grammar)
        except RuntimeError as e:  # xgrammar reports bad input as RuntimeError with a C++ location
            msg = str(e).strip().splitlines()[0]
            msg = msg.split(": ", 1)[1] if msg.startswith("[") and ": " in msg else msg
            raise ValueError(f"{p.kind} could not be compiled ({self.name}): {msg}") from None
        return _Grammar(g)

    def _json(self, schema: dict, any_whitespace: bool):
        """xgrammar's JSON-schema grammar, mended in its EBNF text before compiling:
        - free whitespace is params.JSON_WS_EBNF (each `whitespace_N{0, K}` run swapped for it);
        - characters of length-bounded strings exclude control characters, as JSON requires
          (xgrammar 0.2.9 allows a raw tab there, which no JSON parser accepts)."""
        import xgrammar as xgr

        k = 64  # a marker count: only xgrammar's whitespace runs carry it
        ebnf = str(xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=any_whitespace, max_whitespace_cnt=k))
        ebnf = ebnf.replace(_BOUNDED_STRING_CHAR, _JSON_STRING_CHAR)
        if any_whitespace:
            ebnf, n = re.subn(r"\bwhitespace(?:_\d+)?\{0, %d\}" % k, "json_ws", ebnf)
            if n == 0 and "whitespace" in ebnf:
                raise RuntimeError("xgrammar's JSON grammar changed shape: its whitespace rules were not found")
            ebnf += "\n" + JSON_WS_EBNF + "\n"
        return self._compiler.compile_grammar(ebnf)


_BOUNDED_STRING_CHAR = r'[^\"\\\r\n]'
_JSON_STRING_CHAR = r'[^\0-\x1f\"\\]'
