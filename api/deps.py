"""`Annotated` dependency aliases: the tenant behind the bearer key, the job store, settings.

All `async def`: none of them blocks, and FastAPI would run a plain `def` dependency in the
thread pool (a thread hop per dependency per request)."""

from __future__ import annotations

from typing import Annotated

from celery import Celery
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from harmprune.api.auth import KeyRing
from harmprune.api.errors import ApiError
from harmprune.api.middleware import Metrics
from harmprune.jobs.store import JobStore
from harmprune.settings import Settings

bearer = HTTPBearer(auto_error=False, description="An API key issued by the operator.")


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_store(request: Request) -> JobStore:
    return request.app.state.store


async def get_celery(request: Request) -> Celery:
    return request.app.state.celery


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


async def get_tenant(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> str:
    keys: KeyRing = request.app.state.keys
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None:
        raise ApiError(
            401,
            "unauthorized",
            "missing API key: send Authorization: Bearer <key>",
            headers=challenge,
        )
    tenant = keys.tenant_for(credentials.credentials)
    if tenant is None:
        raise ApiError(401, "unauthorized", "invalid API key", headers=challenge)
    return tenant


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[JobStore, Depends(get_store)]
CeleryDep = Annotated[Celery, Depends(get_celery)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
TenantDep = Annotated[str, Depends(get_tenant)]
