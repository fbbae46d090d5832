"""What every tool-call parser does, on whole outputs and on streams.

A parser finds where tool calls begin (`start`) and turns the text from there into calls
(`parse_calls`). Streaming: text before a possible start goes out as content at once; from the
start on it is held, and each call goes out as soon as `parse_calls` sees it complete. What does
not parse as calls at the end is returned as content, so nothing the model wrote is lost.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass


@dataclass
class ParsedCall:
    name: str
    arguments: str  # JSON text


def arguments_json(args) -> str:
    """A call's arguments as OpenAI sends them: JSON text of an object."""
    if isinstance(args, str):
        try:
            json.loads(args)
            return args
        except ValueError:
            return json.dumps({"input": args})
    return json.dumps(args if args is not None else {}, ensure_ascii=False)


class ToolParser(ABC):
    def __init__(self):
        self._text = ""
        self._sent = 0  # chars of content already streamed
        self._start: int | None = None  # where the held tool-call text begins
        self._calls_sent = 0

    @abstractmethod
    def start(self, text: str) -> int | None:
        """Index where tool calls begin in `text`, or None."""

    def partial_start(self, text: str) -> int | None:
        """Index from where `text` could still turn into a start (a marker cut in two): hold it."""
        return None

    @abstractmethod
    def parse_calls(self, text: str, final: bool) -> tuple[list[ParsedCall], bool]:
        """Calls in `text` (which begins at a start); the second item says whether all of it
        parsed (at `final`). Before `final`, only calls that are certainly complete."""

    # -- whole outputs ---------------------------------------------------------------------
    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        """(content, calls): content is None when the output was only calls."""
        i = self.start(text)
        if i is None:
            return text, []
        calls, ok = self.parse_calls(text[i:], final=True)
        if not ok or not calls:
            return text, []
        content = text[:i].strip()
        return content or None, calls

    # -- streams ---------------------------------------------------------------------------
    def feed(self, delta: str) -> tuple[str, list[ParsedCall]]:
        """Add generated text; returns (content to send now, newly complete calls)."""
        self._text += delta
        if self._start is None:
            self._start = self.start(self._text)
        if self._start is None:
            hold = self.partial_start(self._text)
            end = len(self._text) if hold is None else hold
            out, self._sent = self._text[self._sent:end], max(self._sent, end)
            return out, []
        content = self._text[self._sent:self._start]
        self._sent = max(self._sent, self._start)
        calls, _ = self.parse_calls(self._text[self._start:], final=False)
        new = calls[self._calls_sent:]
        self._calls_sent = len(calls)
        return content, new

    def finish(self) -> tuple[str, list[ParsedCall]]:
        """At the end: (content not yet sent, calls not yet sent). If the held text does not parse
        as calls, it is sent as content (unless calls from it already went out)."""
        if self._start is None:
            out, self._sent = self._text[self._sent:], len(self._text)
            return out, []
        calls, ok = self.parse_calls(self._text[self._start:], final=True)
        if ok and calls:
            new = calls[self._calls_sent:]
            self._calls_sent = len(calls)
            return "", new
        if self._calls_sent:
            return "", []
        out, self._sent = self._text[self._sent:], len(self._text)
        return out, []
