"""Health, readiness, metrics, OpenAPI; the app refuses to start without keys; and nothing
under api/ imports torch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from harmprune.api.auth import KeyConfigError
from harmprune.api.main import create_app
from harmprune.settings import Settings
from pydantic import SecretStr

from tests.api.conftest import job_body
from tests.service_stack import ROOT, Namespace, bearer, settings_env, stack_settings
from tests.support.hub_models import llama_8b_config_folder
from tests.support.tenancy import write_tenants_file

pytestmark = pytest.mark.services


def test_healthz_and_readyz(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json() == {"status": "ready", "redis": "ok"}


METRICS_TOKEN = "metrics-token-0123456789"


def test_metrics_need_their_own_token(settings: Settings) -> None:
    with TestClient(create_app(settings, sweep=False)) as client:  # no token configured
        assert client.get("/metrics").status_code == 404
    settings = settings.model_copy(update={"metrics_token": SecretStr(METRICS_TOKEN)})
    with TestClient(create_app(settings, sweep=False)) as client:
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers=bearer()).status_code == 401  # an API key is not it
        ok = client.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
        assert ok.status_code == 200 and "harmprune_http_requests_total" in ok.text


def test_metrics(settings: Settings) -> None:
    settings = settings.model_copy(update={"metrics_token": SecretStr(METRICS_TOKEN)})
    with TestClient(create_app(settings, sweep=False)) as client:
        client.post("/v1/jobs", json=job_body(), headers=bearer())
        client.get("/v1/jobs/" + "0" * 32, headers=bearer())
        text = client.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}).text
    assert 'harmprune_tenant_jobs_submitted_total{tenant="alpha"} 1.0' in text
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
    assert post["requestBody"]["x-max-bytes"] == client.app.state.settings.max_request_bytes
    assert {"202", "401", "403", "413", "422", "429"} <= set(post["responses"])
    assert "anyOf" in spec["components"]["schemas"]["JobRequest"]["properties"]["domain"]


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


def test_submitting_with_preflight_never_imports_torch_in_the_api(
    ns: Namespace, tmp_path: Path
) -> None:
    """A job planned from its config files (a meta model: torch) through the real app: the
    estimate comes from a child process, and the API's own process never imports torch."""
    models = tmp_path / "models"
    d = llama_8b_config_folder(models / "llama")
    (d / "model.safetensors").touch()
    settings = stack_settings(
        ns,
        tmp_path,
        preflight=True,
        default_hardware="gpu",
        local_model_roots=[models],
        tenants_file=write_tenants_file(tmp_path / "tenants.yaml"),
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("HARMPRUNE_")}
    env.update(settings_env(settings))
    code = (
        "import sys, json\n"
        "from fastapi.testclient import TestClient\n"
        "from harmprune.api.main import app_from_env\n"
        "from tests.api.conftest import job_body\n"
        "from tests.service_stack import bearer\n"
        "with TestClient(app_from_env()) as c:\n"
        f"    r = c.post('/v1/jobs', json=job_body(model={str(d)!r}), headers=bearer())\n"
        "    assert r.status_code == 202, r.text\n"
        "    assert r.json()['preflight']['layers'] == 32, r.text\n"
        "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, timeout=300, capture_output=True, text=True
    )
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]
