"""Structured logs: one JSON object per line, with the request id and the tenant on every line
a request causes, and audit lines (`"audit": true`) for submit, cancel and delete.

`RequestContext` (ASGI middleware) gives each request an id (the client's `X-Request-ID` when it
is sane, else a new one) and echoes it in the response; `get_tenant` binds the tenant. Keys and
tokens never reach a log line: nothing here formats a header or a setting.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import time
import uuid
from typing import Any

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
TENANT: contextvars.ContextVar[str | None] = contextvars.ContextVar("tenant", default=None)
_SANE_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

audit_log = logging.getLogger("harmprune.audit")


def bind_tenant(tenant: str) -> None:
    TENANT.set(tenant)


class JsonFormatter(logging.Formatter):
    """`{"ts", "level", "logger", "message", "request_id", "tenant", ...extra}` per line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None) or REQUEST_ID.get(),
            "tenant": getattr(record, "tenant", None) or TENANT.get(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update(fields)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure_json_logging(level: int = logging.INFO) -> None:
    """JSON lines on stderr for the root logger (idempotent)."""
    root = logging.getLogger()
    for handler in root.handlers:
        if isinstance(handler.formatter, JsonFormatter):
            return
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root.addHandler(handler)
    root.setLevel(level)


def audit(event: str, tenant: str, **fields: Any) -> None:
    """One audit line: who did what to which job (never a key or token)."""
    audit_log.info(
        "%s", event, extra={"tenant": tenant, "fields": {"audit": True, "event": event, **fields}}
    )


class RequestContext:
    """Pure ASGI: a request id per request (echoed as X-Request-ID), the tenant reset."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = None
        for name, value in scope.get("headers", ()):
            if name == b"x-request-id":
                given = value.decode("latin-1")
                break
        request_id = given if given and _SANE_ID.match(given) else uuid.uuid4().hex[:16]
        rid_token = REQUEST_ID.set(request_id)
        tenant_token = TENANT.set(None)
        header = (b"x-request-id", request_id.encode())

        async def with_id(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), header]}
            await send(message)

        start = time.perf_counter()
        try:
            await self.app(scope, receive, with_id)
        finally:
            if scope.get("path", "").startswith("/v1/"):
                logging.getLogger("harmprune.access").debug(
                    "%s %s",
                    scope.get("method"),
                    scope.get("path"),
                    extra={"fields": {"ms": round((time.perf_counter() - start) * 1000, 2)}},
                )
            REQUEST_ID.reset(rid_token)
            TENANT.reset(tenant_token)
