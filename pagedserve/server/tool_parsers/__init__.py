"""Tool-call parsers for tool_choice="auto": a model's free text -> content + tool calls.

`--tool-call-parser` takes vLLM's names. Each parser is one file; `ToolParser` (base.py) holds
the streaming logic they share.
"""

from pagedserve.server.tool_parsers.base import ParsedCall, ToolParser
from pagedserve.server.tool_parsers.hermes import HermesParser
from pagedserve.server.tool_parsers.llama3_json import Llama3JsonParser
from pagedserve.server.tool_parsers.pythonic import PythonicParser

PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesParser,
    "llama3_json": Llama3JsonParser,
    "pythonic": PythonicParser,
}

__all__ = ["PARSERS", "ParsedCall", "ToolParser"]
