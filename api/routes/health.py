"""Liveness and readiness (Redis answers): no API key needed. Prometheus metrics: their own token."""

from __future__ import annotations

import hmac

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from harmprune.api.deps import StoreDep
from harmprune.api.errors import ApiError
from harmprune.api.schemas import ErrorOut, HealthOut, ReadyOut
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthOut, summary="The process is up")
def healthz() -> HealthOut:
    return HealthOut(status="ok")


@router.get(
    "/readyz",
    response_model=ReadyOut,
    responses={503: {"model": ReadyOut, "description": "Redis does not answer."}},
    summary="Ready to take jobs: the job store answers",
)
def readyz(store: StoreDep) -> ReadyOut | JSONResponse:
    try:
        store.ping()
    except Exception as err:
        body = ReadyOut(status="unavailable", redis=f"error: {type(err).__name__}")
        return JSONResponse(body.model_dump(), status_code=503)
    return ReadyOut(status="ready", redis="ok")


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text"},
        401: {"model": ErrorOut, "description": "Missing or wrong metrics token."},
        404: {"model": ErrorOut, "description": "Metrics are not enabled."},
    },
    summary="Prometheus metrics",
)
def metrics(request: Request) -> Response:
    """Behind its own bearer token (`HARMPRUNE_METRICS_TOKEN`, not an API key): per-tenant
    counters are not for tenants. Without a configured token, /metrics is not served (404)."""
    token = request.app.state.settings.metrics_token
    if token is None:
        raise ApiError(404, "not_found", "metrics are not enabled (HARMPRUNE_METRICS_TOKEN)")
    given = request.headers.get("authorization", "")
    expected = f"Bearer {token.get_secret_value()}"
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise ApiError(
            401,
            "unauthorized",
            "metrics need their own token",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return Response(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)
