"""Health, readiness, metrics, OpenAPI; the app refuses to start without keys; and nothing
under api/ imports torch."""

from __future__ import annotations

import subprocess
import sys

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from harmprune.api.auth import KeyConfigError
from harmprune.api.main import create_app
from harmprune.settings import Settings
from pydantic import SecretStr

from tests.api.conftest import job_body
from tests.service_stack import ROOT, bearer

pytestmark = pytest.mark.services


def test_healthz_and_readyz(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json() == {"status": "ready", "redis": "ok"}


def test_metrics(client: TestClient) -> None:
    client.post("/v1/jobs", json=job_body(), headers=bearer())
    client.get("/v1/jobs/" + "0" * 32, headers=bearer())
    text = client.get("/metrics").text
    assert 'harmprune_jobs_submitted_total{hardware="cpu"} 1.0' in text
    assert 'harmprune_jobs{state="queued"} 1.0' in text
    assert 'harmprune_http_requests_total{method="POST",route="/v1/jobs",status="202"} 1.0' in text
    # Route templates, not raw paths: ids do not explode the label space.
    assert 'route="/v1/jobs/{job_id}",status="404"' in text
    assert "harmprune_http_request_duration_seconds_bucket" in text


def test_openapi_documents_every_route(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert client.get("/docs").status_code == 200
    ops = {(m.upper(), p) for p, item in spec["paths"].items() for m in item}
    assert {
        ("POST", "/v1/jobs"),
        ("GET", "/v1/jobs"),
        ("GET", "/v1/jobs/{job_id}"),
        ("POST", "/v1/jobs/{job_id}/cancel"),
        ("GET", "/v1/jobs/{job_id}/report"),
        ("DELETE", "/v1/jobs/{job_id}"),
        ("GET", "/healthz"),
        ("GET", "/readyz"),
        ("GET", "/metrics"),
    } <= ops
    assert "HTTPBearer" in spec["components"]["securitySchemes"]
    for route in client.app.routes:
        if isinstance(route, APIRoute) and route.path.startswith("/v1"):
            assert route.response_model is not None or route.status_code == 204, route.path
    post = spec["paths"]["/v1/jobs"]["post"]
    assert {"202", "401", "413", "422"} <= set(post["responses"])
    assert "anyOf" in spec["components"]["schemas"]["JobCreate"]["properties"]["domain"]


def test_no_keys_no_app(settings: Settings) -> None:
    with pytest.raises(KeyConfigError, match="no API keys configured"):
        create_app(settings.model_copy(update={"api_keys": None}))
    bad = settings.model_copy(update={"api_keys": SecretStr("alpha=short")})
    with pytest.raises(KeyConfigError, match="at least 16"):
        create_app(bad)


def test_api_never_imports_torch() -> None:
    code = (
        "import sys, os\n"
        "os.environ['HARMPRUNE_API_KEYS'] = 't=0123456789abcdef0123'\n"
        "import harmprune.api.main, harmprune.api.routes.jobs, harmprune.workers.client, harmprune.jobs.store\n"
        "harmprune.api.main.app_from_env()\n"
        "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)
