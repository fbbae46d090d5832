"""A request's output constraint, from whichever field the client used: OpenAI's
`response_format`, vLLM's `structured_outputs`, or vLLM's older `guided_*` fields."""

from __future__ import annotations

from pagedserve.engine.structured_output import StructuredOutputsParams
from pagedserve.server import protocol as P
from pagedserve.server.errors import APIError


def from_request(body: P._SamplingFields) -> tuple[StructuredOutputsParams | None, str | None]:
    """(the constraint or None, the field that set it). 400 when two fields ask for one."""
    found: list[tuple[str, dict]] = []
    rf = body.response_format
    if rf is not None and rf.type == "json_object":
        found.append(("response_format", {"json_object": True}))
    elif rf is not None and rf.type == "json_schema":
        found.append(("response_format", {"json": rf.json_schema.schema_}))
    if body.structured_outputs is not None:
        so = body.structured_outputs
        found.append(("structured_outputs", {
            "json": so.json_, "regex": so.regex, "choice": so.choice, "grammar": so.grammar,
            "json_object": so.json_object, "disable_any_whitespace": so.disable_any_whitespace}))
    for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar"):
        v = getattr(body, name)
        if v is not None:
            found.append((name, {name.removeprefix("guided_"): v}))
    if not found:
        return None, None
    if len(found) > 1:
        raise APIError(400, f"give one output constraint, not {' and '.join(f for f, _ in found)}", param=found[1][0])
    field, kw = found[0]
    try:
        return StructuredOutputsParams(**kw), field
    except ValueError as e:
        raise APIError(400, f"{field}: {e}", param=field) from None
