"""Structured logs: one JSON object per line, with the request id and the tenant on every line
a request causes, and audit lines (`"audit": true`) for submit, cancel and delete.

`RequestContext` (ASGI middleware) gives each request an id (the client's `X-Request-ID` when it
is sane, else a new one) and echoes it in the response; `get_tenant` binds the tenant. Keys and
tokens never reach a log line: nothing here formats a header or a setting.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

from harmprune.jobs.logs import REQUEST_ID, TENANT, JsonFormatter, configure_json_logging

__all__ = ["REQUEST_ID", "TENANT", "JsonFormatter", "RequestContext", "audit", "bind_tenant"]
__all__ += ["configure_json_logging"]

audit_log = logging.getLogger("harmprune.audit")
_SANE_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def bind_tenant(tenant: str) -> None:
    TENANT.set(tenant)


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
