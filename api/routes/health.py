"""Liveness, readiness (Redis answers) and Prometheus metrics. No API key needed."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from harmprune.api.deps import StoreDep
from harmprune.api.schemas import HealthOut, ReadyOut
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
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text"}},
    summary="Prometheus metrics",
)
def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)
