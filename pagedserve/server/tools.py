"""Tool calling: how tools reach the prompt, and how tool_choice constrains the output.

- tool_choice "required" / a named function: the output is forced by a JSON-schema grammar built
  from the tools (a list of {"name", "parameters"} objects, or the named function's arguments);
- "auto": the model writes freely and `--tool-call-parser` finds the calls;
- "none": plain text.

Prompts: a chat template that renders `tools` gets them (and assistant tool_calls / tool
results) as transformers defines them. A template without tool support (SmolLM2's) gets the
conversation rewritten in Hermes form instead, inside its own roles: the tool list in the system
message, calls as <tool_call> blocks, results as <tool_response> blocks in a user turn. That is
what the `hermes` parser reads back.
"""

from __future__ import annotations

import json

from pagedserve.engine.structured_output import StructuredOutputsParams
from pagedserve.engine.structured_output.schema_check import check_schema
from pagedserve.server import protocol as P
from pagedserve.server.errors import APIError

TOOL_PROMPT = (
    "You can call functions to help with the user's request. The functions are listed below, one "
    "JSON signature per line, between <tools> and </tools>:\n<tools>\n{tools}\n</tools>\n"
    "To call a function, answer with a JSON object holding its name and arguments between "
    "<tool_call> and </tool_call>, one block per call:\n"
    '<tool_call>\n{{"name": "<function name>", "arguments": {{<arguments as JSON>}}}}\n</tool_call>'
)


def template_supports_tools(tokenizer) -> bool:
    tpl = getattr(tokenizer, "chat_template", None) or ""
    return isinstance(tpl, str) and "tools" in tpl


def resolve_tool_choice(body: P.ChatCompletionRequest, auto_enabled: bool) -> str | P.NamedToolChoice:
    """The effective tool_choice, checked against the tools; 400 for what cannot work."""
    tools = body.tools or []
    choice = body.tool_choice
    if choice is None:
        choice = "auto" if tools else "none"
    if not tools:
        if choice != "none":
            raise APIError(400, "tool_choice needs tools: give the tools the model may call", param="tool_choice")
        return "none"
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise APIError(400, f"tool names must be unique, got {names}", param="tools")
    for t in tools:
        if t.function.parameters is not None:
            try:
                check_schema(t.function.parameters)
            except ValueError as e:
                raise APIError(400, f"tools: function {t.function.name!r} parameters: {e}", param="tools") from None
    if isinstance(choice, P.NamedToolChoice) and choice.function.name not in names:
        raise APIError(400, f"tool_choice names function {choice.function.name!r}, which is not in tools {names}",
                       param="tool_choice")
    if choice == "auto" and not auto_enabled:
        raise APIError(400, '"auto" tool choice (the default when tools are given) needs the server started with '
                            "--enable-auto-tool-choice --tool-call-parser NAME; or send tool_choice "
                            '"required", "none" or a named function', param="tool_choice")
    return choice


def tool_constraint(body: P.ChatCompletionRequest, choice) -> StructuredOutputsParams | None:
    """The grammar that forces a call, for "required" and a named function."""
    tools = body.tools or []
    if isinstance(choice, P.NamedToolChoice):
        fn = next(t.function for t in tools if t.function.name == choice.function.name)
        return StructuredOutputsParams(json=fn.parameters or {"type": "object"})
    if choice == "required":
        items = [{
            "type": "object",
            "properties": {"name": {"type": "string", "enum": [t.function.name]},
                           "parameters": t.function.parameters or {"type": "object"}},
            "required": ["name", "parameters"],
            "additionalProperties": False,
        } for t in tools]
        schema = {"type": "array", "minItems": 1, "items": items[0] if len(items) == 1 else {"anyOf": items}}
        if not body.parallel_tool_calls:
            schema["maxItems"] = 1
        return StructuredOutputsParams(json=schema)
    return None


def parse_required(text: str) -> list[tuple[str, str]] | None:
    """A "required" output (a JSON list of {"name", "parameters"}) -> [(name, arguments JSON)]."""
    try:
        items = json.loads(text)
    except ValueError:
        return None
    if not isinstance(items, list) or not all(isinstance(i, dict) and "name" in i for i in items):
        return None
    return [(i["name"], json.dumps(i.get("parameters", {}), ensure_ascii=False)) for i in items]


def conversation(body: P.ChatCompletionRequest, tokenizer) -> tuple[list[dict], list[dict] | None]:
    """(messages, tools) for the chat template: native when the template renders tools,
    rewritten in Hermes form otherwise (module docstring)."""
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
    native = template_supports_tools(tokenizer)
    uses_tools = bool(tools) or any(m.role == "tool" or m.tool_calls for m in body.messages)
    messages: list[dict] = []
    for m in body.messages:
        role = "system" if m.role == "developer" else m.role
        msg: dict = {"role": role, "content": m.text()}
        if m.tool_calls:
            if native:
                msg["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                    "name": c.function.name, "arguments": _loads_or_text(c.function.arguments)}} for c in m.tool_calls]
            else:
                blocks = "\n".join(
                    "<tool_call>\n" + json.dumps({"name": c.function.name, "arguments": _loads_or_text(c.function.arguments)},
                                                 ensure_ascii=False) + "\n</tool_call>" for c in m.tool_calls)
                msg["content"] = (msg["content"] + "\n" if msg["content"] else "") + blocks
        if role == "tool":
            if native:
                if m.tool_call_id:
                    msg["tool_call_id"] = m.tool_call_id
                if m.name:
                    msg["name"] = m.name
            else:
                msg = {"role": "user", "content": f"<tool_response>\n{m.text()}\n</tool_response>"}
        messages.append(msg)
    if native or not uses_tools:
        return messages, tools if native else None
    if tools:
        listing = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
        prompt = TOOL_PROMPT.format(tools=listing)
        if messages and messages[0]["role"] == "system":
            messages[0] = {"role": "system", "content": messages[0]["content"] + "\n\n" + prompt}
        else:
            messages.insert(0, {"role": "system", "content": prompt})
    # Tool results follow each other as user turns; templates that insist on alternation get
    # them merged into one.
    merged: list[dict] = []
    for msg in messages:
        if merged and msg["role"] == "user" and merged[-1]["role"] == "user" and msg["content"].startswith("<tool_response>"):
            merged[-1] = {"role": "user", "content": merged[-1]["content"] + "\n" + msg["content"]}
        else:
            merged.append(msg)
    return merged, None


def _loads_or_text(arguments: str):
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments
