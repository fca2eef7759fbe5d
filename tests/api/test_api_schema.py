"""Property-based: schemathesis generates requests from the OpenAPI schema (valid and invalid,
with and without a key) and checks that no answer is a 5xx and that every answer fits the
schema (status code, content type, body)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import schemathesis
from harmprune.api.main import create_app
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.service_stack import Namespace, bearer, purge, session_redis, stack_settings

pytestmark = [pytest.mark.services, pytest.mark.serial]

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def _build_app() -> tuple[object, str]:
    """Built at import (schemathesis needs the schema to collect); connects to Redis lazily."""
    import tempfile
    import uuid

    prefix = f"hptest-schema-{uuid.uuid4().hex[:10]}"
    ns = Namespace(session_redis().url(), prefix, None)  # type: ignore[arg-type]
    tmp = Path(tempfile.gettempdir()) / prefix  # never written: no worker runs here
    return create_app(stack_settings(ns, tmp, max_request_bytes=64_000), sweep=False), prefix


APP, PREFIX = _build_app()
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@pytest.fixture(scope="module", autouse=True)
def _real_redis_namespace(redis_url: str) -> Iterator[None]:
    client = redis.Redis.from_url(redis_url, socket_connect_timeout=2)
    yield
    purge(client, PREFIX)
    client.close()


@schema.parametrize()
@hypothesis_settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_5xx_with_a_valid_key(case: schemathesis.Case) -> None:
    case.call_and_validate(headers=bearer("alpha"), checks=CHECKS)


@schema.parametrize()
@hypothesis_settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_5xx_without_a_key(case: schemathesis.Case) -> None:
    case.call_and_validate(checks=[not_a_server_error])
