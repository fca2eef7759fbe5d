"""One mapping from the engine's error hierarchy (harmprune.errors and its subclasses) to HTTP:
every class answers its status, its code and (for input errors) the field, through the real
app's handlers. A new HarmpruneError subclass without a row here fails the coverage test."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from harmprune.api.main import create_app
from harmprune.audit.checks import AuditError
from harmprune.errors import (
    AttributionError,
    CalibrationError,
    HarmpruneError,
    JobCancelled,
    ModelLoadError,
    NotPermitted,
    OutputError,
    PublishError,
    QuotaExceeded,
    RequestRefused,
    ServiceUnavailable,
    SpecError,
    UnsupportedModelError,
)
from harmprune.inputs.preflight import HubUnreachable, PreflightRefused, RepoNotVisible
from harmprune.output.signing import SigningError
from harmprune.settings import Settings

pytestmark = pytest.mark.services

# (the error, status, code, field named in `fields`, Retry-After expected)
CASES: list[tuple[HarmpruneError, int, str, str | None, bool]] = [
    (HarmpruneError("boom"), 500, "job_error", None, False),
    (SpecError("invalid domain spec"), 422, "invalid_spec", "domain", False),
    (ModelLoadError("unknown model: x"), 422, "model_not_loadable", "model", False),
    (RepoNotVisible("unknown model: x"), 422, "model_not_loadable", "model", False),
    (UnsupportedModelError("architecture 't5'"), 422, "unsupported_model", "model", False),
    (CalibrationError("no pairs"), 500, "calibration_failed", None, False),
    (AttributionError("nan"), 500, "attribution_failed", None, False),
    (OutputError("not writable"), 422, "output_not_writable", None, False),
    (PublishError("403 from the Hub"), 502, "publish_failed", None, False),
    (PublishError("503 from the Hub", transient=True), 503, "publish_failed", None, True),
    (JobCancelled("cancelled"), 409, "cancelled", None, False),
    (
        PreflightRefused("hardware", "no multi-GPU workers"),
        422,
        "preflight_refused",
        "hardware",
        False,
    ),
    (HubUnreachable("cannot reach the Hub"), 503, "hub_unreachable", None, True),
    (AuditError("org/x is not a Hub repo id"), 422, "audit_failed", None, False),
    (SigningError("the signing key is not an EC key"), 422, "signing_failed", None, False),
    (RequestRefused("seed", "too large"), 422, "invalid_request", "seed", False),
    (NotPermitted("publish.repo_id", "not yours"), 403, "not_permitted", "publish.repo_id", False),
    (QuotaExceeded("(rate)", "too fast", retry_after_s=7), 429, "quota_exceeded", None, True),
    (
        ServiceUnavailable("queue down", code="queue_unavailable"),
        503,
        "queue_unavailable",
        None,
        True,
    ),
]


def _subclasses(cls: type) -> set[type]:
    out = set()
    for sub in cls.__subclasses__():
        out |= {sub, *_subclasses(sub)}
    return out


def test_every_engine_error_class_has_a_case() -> None:
    import harmprune.cli.service

    covered = {type(err) for err, *_ in CASES}
    missing = {c for c in _subclasses(HarmpruneError) | {HarmpruneError} if c not in covered} - {
        harmprune.cli.service.ServiceCommandError
    }
    assert not missing, sorted(c.__name__ for c in missing)


@pytest.fixture
def raising_client(settings: Settings) -> Any:
    app = create_app(settings, sweep=False)
    holder: dict[str, HarmpruneError] = {}

    @app.get("/raise")
    def _raise() -> None:
        raise holder["error"]

    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, holder


@pytest.mark.parametrize(
    ("error", "status", "code", "field", "retry"),
    CASES,
    ids=lambda v: v if isinstance(v, str | int) else type(v).__name__,
)
def test_engine_errors_map_to_one_status_each(
    raising_client: Any,
    error: HarmpruneError,
    status: int,
    code: str,
    field: str | None,
    retry: bool,
) -> None:
    client, holder = raising_client
    holder["error"] = error
    r = client.get("/raise")
    assert r.status_code == status, r.text
    body = r.json()["error"]
    assert body["code"] == code
    assert ("retry-after" in r.headers) is retry
    if field is None:
        assert body.get("fields") is None
    else:
        assert body["fields"][0]["field"] == field and body["message"].startswith(f"{field}: ")
    if status == 500:
        assert body["message"] == "internal error"  # no engine detail leaks out of a 500
