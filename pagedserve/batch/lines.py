"""Batch input and output lines.

Input, one JSON object a line (OpenAI's Batch API, vLLM's run-batch):
    {"custom_id": "doc-1", "method": "POST", "url": "/v1/chat/completions", "body": {...}}
Output, one a finished input line:
    {"id": "batch_req_...", "custom_id": "doc-1",
     "response": {"status_code": 200, "request_id": "...", "body": {...}}, "error": null}
A line that could not be sent at all (malformed, unknown url) gets "response": null and
"error": {"code", "message"}; a request the endpoint refused (400, 404) is a response with that
status code, as OpenAI writes it.

Everything is checked before any line runs (`parse`), so a bad file fails at `validating` with one
error per bad line, never half-way through.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass

ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
MAX_CUSTOM_ID = 512  # characters; it reaches the database and the output file
MAX_ERRORS = 1000  # per-line errors kept for a failed validation (the first ones)


@dataclass(frozen=True)
class BatchLine:
    index: int  # 0-based line number in the input file
    custom_id: str
    url: str
    body: dict


@dataclass(frozen=True)
class LineError:
    line: int  # 1-based, as an editor shows it
    code: str
    message: str
    custom_id: str | None = None
    param: str | None = None

    def as_dict(self) -> dict:
        return {"code": self.code, "message": self.message, "param": self.param, "line": self.line}


def _short(s: str, n: int = 80) -> str:
    return json.dumps(s[:n] + ("..." if len(s) > n else ""))


def parse(data: bytes, *, endpoint: str | None = None, models: list[str] | None = None,
          max_lines: int = 50_000, max_errors: int = MAX_ERRORS) -> tuple[list[BatchLine], list[LineError]]:
    """Every line of a batch input file, or why each bad one is bad. `endpoint`: the url every line
    must have (the Batches API's batch endpoint; None: any of ENDPOINTS, as run-batch allows);
    `models`: the served model names a body's "model" must be one of (None: not checked)."""
    lines: list[BatchLine] = []
    errors: list[LineError] = []
    seen: dict[str, int] = {}
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        return [], [LineError(1, "invalid_file", f"the file is not UTF-8 text (byte {e.start})")]
    raw = text.splitlines()
    if len([r for r in raw if r.strip()]) > max_lines:
        return [], [LineError(1, "too_many_lines", f"the file has more than {max_lines} requests (the limit: "
                                                   "--max-batch-lines); split it into several batches")]
    for n, row in enumerate(raw, start=1):
        if not row.strip():
            continue
        err = _check(n, row, endpoint, models, seen)
        if isinstance(err, LineError):
            if len(errors) < max_errors:
                errors.append(err)
            continue
        lines.append(BatchLine(len(lines), *err))
    if not lines and not errors:
        errors.append(LineError(1, "empty_file", "the file has no requests: one JSON object a line"))
    return lines, errors


def _check(n: int, row: str, endpoint: str | None, models: list[str] | None, seen: dict):
    try:
        obj = json.loads(row)
    except ValueError as e:
        return LineError(n, "invalid_json", f"line {n} is not valid JSON: {e.msg} at column {e.colno}")
    if not isinstance(obj, dict):
        return LineError(n, "invalid_request", f"line {n} must be a JSON object, got {type(obj).__name__}")
    cid = obj.get("custom_id")
    if not isinstance(cid, str) or not cid:
        return LineError(n, "missing_required_parameter", f"line {n}: custom_id must be a non-empty string",
                         param="custom_id")
    if len(cid) > MAX_CUSTOM_ID:
        return LineError(n, "invalid_request", f"line {n}: custom_id is longer than {MAX_CUSTOM_ID} characters",
                         param="custom_id")
    if cid in seen:
        return LineError(n, "duplicate_custom_id", f"line {n}: custom_id {_short(cid)} is also on line {seen[cid]}; "
                                                   "each request needs its own", cid, "custom_id")
    method = obj.get("method", "POST")
    if method != "POST":
        return LineError(n, "invalid_request", f"line {n}: method must be POST, got {_short(str(method))}", cid, "method")
    url = obj.get("url")
    if url not in ENDPOINTS:
        return LineError(n, "invalid_url", f"line {n}: url must be one of {list(ENDPOINTS)}, got "
                                           f"{_short(str(url))}", cid, "url")
    if endpoint is not None and url != endpoint:
        return LineError(n, "mismatched_url", f"line {n}: url {url} differs from the batch's endpoint {endpoint}",
                         cid, "url")
    body = obj.get("body")
    if not isinstance(body, dict):
        return LineError(n, "invalid_request", f"line {n}: body must be a JSON object (the request)", cid, "body")
    if body.get("stream"):
        return LineError(n, "invalid_request", f"line {n}: stream is not supported in a batch", cid, "body.stream")
    model = body.get("model")
    if models is not None and model is not None and model not in models:
        return LineError(n, "model_not_found", f"line {n}: model {_short(str(model))} is not served here "
                                               f"(served: {models})", cid, "body.model")
    seen[cid] = n
    return cid, url, body


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def output_line(custom_id: str, status: int, body, request_id: str | None = None) -> dict:
    return {"id": new_id("batch_req"), "custom_id": custom_id,
            "response": {"status_code": status, "request_id": request_id or new_id("req"), "body": body},
            "error": None}


def error_line(custom_id: str | None, code: str, message: str) -> dict:
    return {"id": new_id("batch_req"), "custom_id": custom_id, "response": None,
            "error": {"code": code, "message": message}}


def is_success(line: dict) -> bool:
    r = line.get("response")
    return r is not None and 200 <= r.get("status_code", 0) < 300
