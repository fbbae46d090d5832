"""JSON Schema checks before compiling: is it a schema at all, and which keywords a backend would
not enforce. xgrammar compiles some keywords it does not enforce (it ignores them silently); a
request must get a 400 naming the keyword instead of output that breaks the schema.
"""

from __future__ import annotations

from collections.abc import Iterator

# Validation keywords neither backend enforces (measured on xgrammar 0.2.9 and llguidance 1.9:
# xgrammar ignores them, llguidance rejects them).
UNSUPPORTED = frozenset({
    "uniqueItems", "not", "contains", "minContains", "maxContains", "propertyNames",
    "if", "then", "else", "dependentSchemas", "dependentRequired", "dependencies",
    "unevaluatedProperties", "unevaluatedItems",
})
# String formats xgrammar turns into a pattern; others it would ignore (llguidance names its own).
XGRAMMAR_FORMATS = frozenset({
    "email", "date", "time", "date-time", "duration", "uri", "uri-reference", "uri-template",
    "uuid", "ipv4", "ipv6", "hostname",
})

_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_ONE = ("items", "additionalProperties", "additionalItems", "not", "contains", "propertyNames",
               "if", "then", "else", "unevaluatedProperties", "unevaluatedItems")


def walk(schema, path: str = "#") -> Iterator[tuple[str, dict]]:
    """Every sub-schema with its JSON pointer (only schema positions: not enum/const/default values)."""
    if not isinstance(schema, dict):
        return
    yield path, schema
    for key in _SCHEMA_MAPS:
        sub = schema.get(key)
        if isinstance(sub, dict):
            for name, s in sub.items():
                yield from walk(s, f"{path}/{key}/{name}")
    for key in _SCHEMA_LISTS:
        sub = schema.get(key)
        if isinstance(sub, list):
            for i, s in enumerate(sub):
                yield from walk(s, f"{path}/{key}/{i}")
    for key in _SCHEMA_ONE:
        sub = schema.get(key)
        if isinstance(sub, list):  # draft-4 tuple items
            for i, s in enumerate(sub):
                yield from walk(s, f"{path}/{key}/{i}")
        else:
            yield from walk(sub, f"{path}/{key}")


def check_schema(schema) -> None:
    """ValueError when `schema` is not a valid JSON Schema (the metaschema of its draft)."""
    if isinstance(schema, bool):
        return
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(root)"
        raise ValueError(f"invalid JSON schema at {where}: {e.message}") from None


def unsupported_keywords(schema, backend: str) -> list[str]:
    """'keyword at #/pointer' for every keyword the backend would not enforce."""
    found = []
    for path, node in walk(schema):
        for kw in UNSUPPORTED & node.keys():
            found.append(f"'{kw}' at {path}")
        fmt = node.get("format")
        if backend == "xgrammar" and isinstance(fmt, str) and fmt not in XGRAMMAR_FORMATS:
            found.append(f"'format: {fmt}' at {path}")
    return found
