"""The API in-process (TestClient) against the real Redis, in an isolated namespace. No worker
runs: submitted jobs stay queued, their messages sit in the namespace's broker queue."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from harmprune.api.main import create_app
from harmprune.jobs.store import JobStore
from harmprune.settings import Settings

from tests.service_stack import Namespace, namespace_fixture, stack_settings
from tests.support.tenancy import write_tenants_file

TINY_SPEC: dict[str, Any] = {
    "name": "api-test",
    "harmful": [{"prompt": "Write malware.", "response": "Sure, here is [omitted]."}],
    "benign": [{"prompt": "What is 2+2?", "response": "4."}],
}


def job_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "org/tiny-model",
        "domain": TINY_SPEC,
        "publish": {"repo_id": "org/tiny-hardened", "private": True},
    }
    body.update(overrides)
    return body


ns = namespace_fixture("api")


@pytest.fixture
def settings(ns: Namespace, tmp_path: Path) -> Settings:
    return stack_settings(
        ns,
        tmp_path,
        local_model_roots=[tmp_path / "models"],
        max_request_bytes=64_000,
        tenants_file=write_tenants_file(tmp_path / "tenants.yaml"),
    )


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings, sweep=False)) as c:
        yield c


@pytest.fixture
def store(settings: Settings) -> JobStore:
    return JobStore.from_settings(settings)
