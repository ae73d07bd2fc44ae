"""The one error shape of the API: {"error": {"code": ..., "message": ..., ...}}."""

from __future__ import annotations

import functools
from typing import Any

import orjson
from aiohttp import web

JSON = "application/json"


class ApiError(Exception):
    """Raised by handlers and middleware; the middleware turns it into the error response."""

    def __init__(
        self,
        http_status: int,
        code: str,
        message: str,
        *,
        headers: dict[str, str] | None = None,
        close_connection: bool = False,
        **extra: Any,
    ):
        super().__init__(message)
        self.status = http_status
        self.code = code
        self.message = message
        self.headers = headers
        self.close_connection = close_connection
        self.extra = extra

    def response(self) -> web.Response:
        response = error_response(self.status, self.code, self.message, headers=self.headers, **self.extra)
        if self.close_connection:
            response.force_close()
        return response


def error_response(
    http_status: int, code: str, message: str, *, headers: dict[str, str] | None = None, **extra: Any
) -> web.Response:
    body = orjson.dumps({"error": {"code": code, "message": message, **extra}}) if extra else error_body(code, message)
    return web.Response(status=http_status, body=body, content_type=JSON, headers=headers)


@functools.lru_cache(maxsize=64)
def error_body(code: str, message: str) -> bytes:
    """The body of an error without extra fields, made once for the usual ones: refusals for
    load come by the thousand a second with a handful of different bodies."""
    return orjson.dumps({"error": {"code": code, "message": message}})


# aiohttp's own HTTP exceptions (unmatched route, wrong method, body too large...) -> our codes.
HTTP_CODES = {
    400: ("bad_request", "the request could not be read"),
    401: ("unauthorized", "missing or invalid API key"),
    404: ("not_found", "no such endpoint"),
    405: ("method_not_allowed", "this endpoint does not accept that method"),
    408: ("request_timeout", "the request took too long to arrive"),
    413: ("payload_too_large", "the request body is too large"),
    415: ("unsupported_media_type", "send the body as application/json"),
    431: ("headers_too_large", "the request headers are too large"),
}


def from_http_exception(exc: web.HTTPException) -> web.Response:
    code, message = HTTP_CODES.get(exc.status, ("http_error", exc.reason or "request failed"))
    headers = {}
    if isinstance(exc, web.HTTPMethodNotAllowed):
        headers["Allow"] = ", ".join(sorted(exc.allowed_methods))
    return error_response(exc.status, code, message, headers=headers or None)
