"""Structured logs for the API and the workers: one JSON object per line, with the request id
(API), the job id (worker) and the tenant on every line, from context variables. Torch-free."""

from __future__ import annotations

import contextvars
import json
import logging
from typing import Any

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
TENANT: contextvars.ContextVar[str | None] = contextvars.ContextVar("tenant", default=None)
JOB_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("job_id", default=None)


class ContextFilter(logging.Filter):
    """Stamps the request id, job id and tenant of the current context on each record when it
    is emitted (a handler may format it later, elsewhere)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, var in (("request_id", REQUEST_ID), ("job_id", JOB_ID), ("tenant", TENANT)):
            if getattr(record, name, None) is None:
                setattr(record, name, var.get())
        return True


class JsonFormatter(logging.Formatter):
    """`{"ts", "level", "logger", "message", "request_id", "job_id", "tenant", ...}` per line;
    `extra={"fields": {...}}` adds keys (audit lines)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None) or REQUEST_ID.get(),
            "job_id": getattr(record, "job_id", None) or JOB_ID.get(),
            "tenant": getattr(record, "tenant", None) or TENANT.get(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update(fields)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure_json_logging(level: int = logging.INFO) -> None:
    """JSON lines on stderr for the root logger, replacing its handlers (idempotent)."""
    root = logging.getLogger()
    if any(isinstance(h.formatter, JsonFormatter) for h in root.handlers):
        return
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    handler.addFilter(ContextFilter())
    root.handlers = [handler]
    root.setLevel(level)


# Libraries that give their root logger a plain stderr handler of their own when imported
# (transformers' does not even propagate): in a worker those lines would not be JSON, and in the
# CLI they would cut through the stage bars.
LIBRARY_LOGGERS = ("transformers", "huggingface_hub")


def route_library_logs() -> None:
    """transformers' and the Hub client's records go to the root logger's handlers (JSON lines
    in a worker, one line each in the CLI) instead of their own handlers. Imports no torch."""
    import huggingface_hub.utils.logging  # noqa: F401  (adds its handler when imported)
    import transformers.utils.logging  # adds its handler when first used

    transformers.utils.logging.disable_default_handler()
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True
