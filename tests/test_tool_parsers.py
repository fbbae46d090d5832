"""Tool-call parsers on recorded model outputs: whole and streamed in pieces of every size."""

from __future__ import annotations

import json

import pytest

from pagedserve.server.tool_parsers import PARSERS

WEATHER = {"city": "Paris", "unit": "celsius"}
CASES = {
    "hermes": [
        # (output, content, [(name, arguments)])
        ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>',
         None, [("get_weather", WEATHER)]),
        ('Let me look that up.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
         '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>',
         "Let me look that up.", [("get_weather", WEATHER), ("get_time", {"zone": "CET"})]),
        # EOS right after the JSON: no closing tag
        ('<tool_call>\n{"name": "get_time", "arguments": {}}', None, [("get_time", {})]),
        # malformed JSON: all of it stays content
        ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par\n</tool_call>',
         '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par\n</tool_call>', []),
        ("No tools needed: it is sunny.", "No tools needed: it is sunny.", []),
        ("a < b and <tool_ is not a call", "a < b and <tool_ is not a call", []),
    ],
    "llama3_json": [
        ('{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}', None, [("get_weather", WEATHER)]),
        ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}; '
         '{"name": "get_time", "parameters": {"zone": "CET"}}', None,
         [("get_weather", WEATHER), ("get_time", {"zone": "CET"})]),
        ('{"name": "get_weather", "parameters": {"city": ', '{"name": "get_weather", "parameters": {"city": ', []),
        ("The answer is 4.", "The answer is 4.", []),
    ],
    "pythonic": [
        ('[get_weather(city="Paris", unit="celsius")]', None, [("get_weather", WEATHER)]),
        ("[get_weather(city='Paris', unit='celsius'), get_time(zone='CET')]", None,
         [("get_weather", WEATHER), ("get_time", {"zone": "CET"})]),
        ('[get_weather(city="Paris"', '[get_weather(city="Paris"', []),
        ("[1, 2, 3] are numbers", "[1, 2, 3] are numbers", []),
        ("Sunny today.", "Sunny today.", []),
    ],
}
ALL = [(name, *case) for name, cases in CASES.items() for case in cases]


@pytest.mark.parametrize("name, output, content, calls", ALL)
def test_whole_output(name, output, content, calls):
    got_content, got = PARSERS[name]().parse(output)
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in got] == calls


@pytest.mark.parametrize("piece", [1, 3, 7, 1000])
@pytest.mark.parametrize("name, output, content, calls", ALL)
def test_streamed_output_gives_the_same_result(name, output, content, calls, piece):
    p = PARSERS[name]()
    text, got = "", []
    for i in range(0, len(output), piece):
        t, c = p.feed(output[i:i + piece])
        text, got = text + t, got + c
    t, c = p.finish()
    text, got = text + t, got + c
    assert [(c.name, json.loads(c.arguments)) for c in got] == calls
    if calls:  # text before the calls streams as content (whitespace around it may differ)
        assert text.strip() == (content or "")
    else:  # nothing was a call: every character came out as content, in order
        assert text == output


def test_hermes_streams_text_before_the_call_at_once_and_each_call_when_closed():
    p = PARSERS["hermes"]()
    assert p.feed("Checking. ") == ("Checking. ", [])
    assert p.feed("<tool_") == ("", [])  # maybe a tag: held
    content, calls = p.feed('call>{"name": "f", "arguments": {"x": 1}}</tool_call>')
    assert content == "" and [c.name for c in calls] == ["f"]
    assert p.finish() == ("", [])
