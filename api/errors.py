"""One error shape for every 4xx/5xx: `{"error": {"code", "message", "fields"?}}`."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("api")

STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "request_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "too_many_requests",
    503: "unavailable",
}


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        fields: list[dict[str, str]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.fields, self.headers = fields, headers


def error_response(
    status: int,
    code: str,
    message: str,
    fields: list[dict[str, str]] | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {"code": code, "message": message}
    if fields is not None:
        body["fields"] = fields
    return JSONResponse({"error": body}, status_code=status, headers=headers)


_SOURCES = {"body", "query", "path", "header", "cookie"}


def field_errors(errors: Any) -> list[dict[str, str]]:
    out = []
    for e in errors:
        loc = [str(part) for part in e.get("loc", ())]
        if loc and loc[0] in _SOURCES:
            source, loc = loc[0], loc[1:]
            if source != "body" and loc:
                loc[0] = f"{source}:{loc[0]}"
        msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        out.append({"field": ".".join(loc) or "(body)", "message": msg})
    return out


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.fields, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        fields = field_errors(exc.errors())
        message = "; ".join(f"{f['field']}: {f['message']}" for f in fields[:10])
        return error_response(422, "invalid_request", message or "invalid request", fields)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = STATUS_CODES.get(exc.status_code, "error")
        detail = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
        if exc.status_code == 400 and detail == "There was an error parsing the body":
            code, detail = "invalid_body", "the request body is not valid JSON (UTF-8)"
        return error_response(exc.status_code, code, detail, headers=exc.headers)

    @app.exception_handler(redis.RedisError)
    async def _redis(request: Request, exc: redis.RedisError) -> JSONResponse:
        log.warning("job store unavailable: %s", type(exc).__name__)
        return error_response(
            503,
            "store_unavailable",
            "the job store is unavailable; try again shortly",
            headers={"Retry-After": "5"},
        )

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "internal error")
