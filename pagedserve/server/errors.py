"""OpenAI-style errors: {"error": {"message", "type", "param", "code"}} with the right status."""

from __future__ import annotations

import logging

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

_TYPES = {
    400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 408: "TimeoutError",
    409: "ConflictError", 413: "RequestTooLargeError", 422: "BadRequestError", 429: "RateLimitError",
    500: "InternalServerError", 503: "ServiceUnavailableError", 504: "TimeoutError",
}


def quote(value, limit: int = 200) -> str:
    """A client-supplied value for an error message or a log line: repr'd (control characters and
    quotes escaped) and cut to `limit` characters, so a 4 MB model name is not echoed back."""
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 14] + f"... ({len(r)} chars)"


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "APIError"), "param": param,
                      "code": code if code is not None else status}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def install_error_handlers(app: FastAPI, log: logging.Logger) -> None:
    """OpenAI-shaped bodies for APIError, Starlette's HTTP errors (404/405) and anything unexpected
    (500, logged with its traceback); shared by the server and the gateway."""

    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return error_response(e.status, e.message, e.param, e.code, e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail))

    @app.exception_handler(Exception)
    async def _unexpected(_, e: Exception):
        log.exception("unexpected error")
        return error_response(500, f"internal error: {type(e).__name__}")
