"""One error shape for every 4xx/5xx: `{"error": {"code", "message", "fields"?}}`."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from harmprune.api.logs import TENANT
from harmprune.errors import (
    HarmpruneError,
    JobCancelled,
    NotPermitted,
    PublishError,
    QuotaExceeded,
    RequestRefused,
    ServiceUnavailable,
)
from harmprune.inputs.preflight import HubUnreachable
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
    """An error the API answers with: `{"error": {code, message[, fields]}}` under `status`.
    Routes raise it; the handlers below build one for every other error and `response()` it."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        fields: list[dict[str, str]] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.fields, self.headers = fields, headers

    def response(self) -> JSONResponse:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.fields is not None:
            body["fields"] = self.fields
        return JSONResponse({"error": body}, status_code=self.status, headers=self.headers)


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


# The engine's error fields, by class: what the request should change.
ENGINE_FIELDS = {"SpecError": "domain", "ModelLoadError": "model", "UnsupportedModelError": "model"}


def engine_status(exc: HarmpruneError) -> int:
    """The HTTP status of an engine error: the one mapping of harmprune.errors to statuses.

    RequestRefused (and its NotPermitted 403, QuotaExceeded 429) carry their own; the Hub or a
    dependency that does not answer is a 503; a cancel is a 409; any other user error (bad spec,
    unreadable or unsupported model, preflight refusal) a 422; the rest is ours: 500 (502 for
    the Hub refusing a publish)."""
    if isinstance(exc, RequestRefused):
        return exc.status
    if isinstance(exc, ServiceUnavailable | HubUnreachable):
        return 503
    if isinstance(exc, JobCancelled):
        return 409
    if isinstance(exc, PublishError):
        return 503 if exc.transient else 502
    return 422 if exc.user_error else 500


def engine_error_response(exc: HarmpruneError) -> JSONResponse:
    status = engine_status(exc)
    field = getattr(exc, "field", None) or next(
        (f for c, f in ENGINE_FIELDS.items() if c in {k.__name__ for k in type(exc).__mro__}),
        None,
    )
    message = str(exc)
    if field is not None and not message.startswith(f"{field}: "):
        message = f"{field}: {message}"
    headers = {}
    if isinstance(exc, QuotaExceeded | ServiceUnavailable):
        headers["Retry-After"] = str(exc.retry_after_s)
    elif status == 503:
        headers["Retry-After"] = "30"
    if status >= 500 and status != 503:
        log.error("engine error %s: %s", exc.code, message)
        message = "internal error" if status == 500 else message
    fields = None
    if field is not None and status < 500 and not field.startswith("("):
        fields = [{"field": field, "message": message.removeprefix(f"{field}: ")}]
    return ApiError(status, exc.code, message, fields=fields, headers=headers or None).response()


def install(app: FastAPI) -> None:
    @app.exception_handler(HarmpruneError)
    async def _engine(request: Request, exc: HarmpruneError) -> JSONResponse:
        tenant = TENANT.get()
        if tenant is not None and isinstance(exc, NotPermitted | QuotaExceeded):
            reason = "permission" if isinstance(exc, NotPermitted) else "quota"
            request.app.state.metrics.tenant_refused.labels(tenant, reason).inc()
            log.info("refused (%s): %s", reason, exc)
        return engine_error_response(exc)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        fields = field_errors(exc.errors())
        message = "; ".join(f"{f['field']}: {f['message']}" for f in fields[:10])
        return ApiError(
            422, "invalid_request", message or "invalid request", fields=fields
        ).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = STATUS_CODES.get(exc.status_code, "error")
        detail = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
        if exc.status_code == 400 and detail == "There was an error parsing the body":
            code, detail = "invalid_body", "the request body is not valid JSON (UTF-8)"
        return ApiError(exc.status_code, code, detail, headers=exc.headers).response()

    @app.exception_handler(redis.RedisError)
    async def _redis(request: Request, exc: redis.RedisError) -> JSONResponse:
        log.warning("job store unavailable: %s", type(exc).__name__)
        return ApiError(
            503,
            "store_unavailable",
            "the job store is unavailable; try again shortly",
            headers={"Retry-After": "5"},
        ).response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return ApiError(500, "internal_error", "internal error").response()
